"""The fleet's deploy lock (roles/greeter/library/greeter_lock.py) against the emulator: an SSM
parameter created only if absent, so of runs that race exactly one wins and the others name it;
breaking needs the holder's run id or staleness, is itself a race one breaker wins, and the run
whose lock was broken sees it. Each test runs the real module in its own processes; no lab."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aws_helpers import REPO, Aws
from support.lock_module import Outcome, Worker, race
from support.net import free_port

pytestmark = pytest.mark.aws

ROUNDS = 20
_locks = itertools.count(1)


@pytest.fixture
def lock(aws: Aws) -> str:
    """A lock parameter name no other test uses."""
    return f"/greeter/locktest{next(_locks)}-{secrets.token_hex(3)}/deploy-lock"


@pytest.fixture(scope="module")
def workers(aws: Aws) -> Iterator[list[Worker]]:
    """Four warm module processes, shared by this file's tests."""
    started = [Worker(aws.env("locktest")) for _ in range(4)]
    yield started
    for worker in started:
        worker.close()


@pytest.fixture
def run(workers: list[Worker]) -> Callable[[dict], Outcome]:
    """One module call, to its end."""
    return workers[0].call


def take(name: str, run_id: str, **extra: object) -> dict:
    record = {"user": "ana", "controller": "laptop", "action": "deploy", "version": "v1.2.0",
              "play": "Deploy in rolling batches"}  # fmt: skip
    return {"name": name, "run_id": run_id, "record": record, **extra}


def stored(aws: Aws, name: str) -> dict:
    return json.loads(aws.client("ssm").get_parameter(Name=name)["Parameter"]["Value"])


def exactly_one_winner(outcomes: list[Outcome]) -> Outcome:
    winners = [o for o in outcomes if o.won]
    assert len(winners) == 1, [(o.returncode, o.msg) for o in outcomes]
    return winners[0]


def test_acquirers_released_together_exactly_one_wins_and_the_others_name_it(
    aws: Aws, workers: list[Worker], tmp_path: Path
) -> None:
    started = time.monotonic()
    for round_number in range(ROUNDS):
        name = f"/greeter/race{round_number}-{secrets.token_hex(3)}/deploy-lock"
        ids = [secrets.token_hex(8) for _ in range(2 + round_number % 3)]  # 2, 3 or 4 at once
        outcomes = race(workers, [take(name, run_id) for run_id in ids], tmp_path)
        winner = exactly_one_winner(outcomes)
        assert winner.result["changed"] and winner.result["held"]
        winning_id = winner.result["holder"]["run_id"]
        assert stored(aws, name)["run_id"] == winning_id
        for loser in outcomes:
            if loser is not winner:
                assert f"Another run holds the fleet's deploy lock (SSM parameter {name})" in (
                    loser.msg
                ), loser.msg
                assert f"run {winning_id} of ana@laptop: deploy of v1.2.0" in loser.msg
                assert f"-e greeter_lock_break={winning_id}" in loser.msg
                assert "Nothing was changed." in loser.msg
    print(f"\n[lock timing] {ROUNDS} rounds of 2-4 racing acquirers: "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip


def test_breaking_needs_the_run_id_or_staleness_and_the_refusal_shows_the_age(
    aws: Aws, run: Callable[[dict], Outcome], lock: str
) -> None:
    dead, breaker = secrets.token_hex(8), secrets.token_hex(8)
    assert run(take(lock, dead)).won

    refused = run(take(lock, breaker))
    assert not refused.won
    assert re.search(
        rf"run {dead} of ana@laptop: deploy of v1\.2\.0 \(play \"Deploy in rolling batches\"\), "
        r"taken 20\d\d-\d\d-\d\dT[0-9:]+Z, \d+ s ago\. Nothing was changed\.",
        refused.msg,
    ), refused.msg

    not_a_run_id = run(take(lock, breaker, break_lock="true"))
    assert not not_a_run_id.won
    assert (
        "greeter_lock_break must be empty, 'stale' or the run id (16 hex digits) that the "
        "refusal names, not 'true'. Nothing was changed." in not_a_run_id.msg
    )

    other_run = secrets.token_hex(8)
    wrong = run(take(lock, breaker, break_lock=other_run))
    assert not wrong.won
    assert f"greeter_lock_break={other_run} names another run than the one holding the lock" in (
        wrong.msg
    )
    assert f"held by run {dead} of ana@laptop" in wrong.msg

    fresh = run(take(lock, breaker, break_lock="stale"))
    assert not fresh.won
    assert re.search(
        r"greeter_lock_break=stale breaks only a lock older than greeter_lock_stale_after "
        r"\(3600 s\), and this one is \d+ s old",
        fresh.msg,
    ), fresh.msg
    assert stored(aws, lock)["run_id"] == dead  # every refusal left the lock alone

    time.sleep(2.2)
    stale = run(take(lock, breaker, break_lock="stale", stale_after=2))
    assert stale.won, stale.msg
    assert re.search(
        rf"Broke the deploy lock of run {dead} of ana@laptop: .* \d+ s ago "
        r"\(greeter_lock_break=stale\)",
        stale.msg,
    ), stale.msg
    assert stale.result["broken"]["run_id"] == dead
    assert stored(aws, lock)["run_id"] == breaker

    # Named by its run id, a lock breaks at once, however young.
    third = secrets.token_hex(8)
    named = run(take(lock, third, break_lock=breaker))
    assert named.won, named.msg
    assert f"Broke the deploy lock of run {breaker}" in named.msg
    assert stored(aws, lock)["run_id"] == third


def test_a_run_whose_lock_was_broken_sees_it_and_its_release_leaves_the_new_lock(
    aws: Aws, run: Callable[[dict], Outcome], lock: str
) -> None:
    first, second = secrets.token_hex(8), secrets.token_hex(8)
    assert run(take(lock, first)).won
    mine = run({"name": lock, "run_id": first, "state": "held"})
    assert mine.won and mine.result["held"] is True
    assert run(take(lock, second, break_lock=first)).won

    checked = run({"name": lock, "run_id": first, "state": "held"})
    assert checked.won and checked.result["held"] is False  # a report, never a failure
    assert (
        f"This run's deploy lock (run {first}, SSM parameter {lock}) was broken: it is now held "
        f"by run {second} of ana@laptop" in checked.msg
    ), checked.msg
    released = run({"name": lock, "run_id": first, "state": "absent"})
    assert released.won and not released.result["changed"]
    assert stored(aws, lock)["run_id"] == second  # not the first run's to delete

    assert run({"name": lock, "run_id": second, "state": "absent"}).result["changed"]
    gone = run({"name": lock, "run_id": first, "state": "held"})
    assert "was broken: nobody holds it now" in gone.msg
    assert run(take(lock, first)).won  # free again


def test_breakers_released_together_exactly_one_takes_the_lock(
    aws: Aws, workers: list[Worker], run: Callable[[dict], Outcome], tmp_path: Path
) -> None:
    """Two or three runs break the same dead run's lock at the same instant: SSM deletes
    unconditionally, so without the break claim two could each delete and take it."""
    for round_number in range(ROUNDS // 2):
        name = f"/greeter/breakrace{round_number}-{secrets.token_hex(3)}/deploy-lock"
        dead = secrets.token_hex(8)
        assert run(take(name, dead)).won
        ids = [secrets.token_hex(8) for _ in range(2 + round_number % 2)]
        outcomes = race(workers, [take(name, run_id, break_lock=dead) for run_id in ids], tmp_path)
        winner = exactly_one_winner(outcomes)
        winning_id = winner.result["holder"]["run_id"]
        assert stored(aws, name)["run_id"] == winning_id
        for loser in outcomes:
            if loser is not winner:
                assert winning_id in loser.msg, (winning_id, loser.msg)
                assert "Nothing was changed." in loser.msg
        claims = aws.client("ssm").get_parameters(Names=[f"{name}-break"])["Parameters"]
        assert claims == []  # the winner removed its claim


def test_purged_deletes_the_lock_and_a_leftover_break_claim_whoever_holds_them(
    aws: Aws, run: Callable[[dict], Outcome], lock: str
) -> None:
    assert run(take(lock, secrets.token_hex(8))).won
    aws.client("ssm").put_parameter(Name=f"{lock}-break", Value="{}", Type="String")
    purged = run({"name": lock, "state": "purged"})
    assert purged.won and purged.result["changed"]
    names = [lock, f"{lock}-break"]
    assert aws.client("ssm").get_parameters(Names=names)["Parameters"] == []
    again = run({"name": lock, "state": "purged"})
    assert again.won and not again.result["changed"]


@pytest.mark.parametrize(
    ("args", "what"),
    [
        ({"state": "held", "run_id": "a1"}, "read"),
        ({"state": "present", "run_id": "a1", "record": {"user": "ana"}}, "write"),
    ],
    ids=["held", "take"],
)
def test_an_unreachable_account_fails_naming_the_lock_and_what_failed(
    aws: Aws, lock: str, args: dict, what: str
) -> None:
    """Any SSM error but the lock's own two (absent, taken) stops the run, naming the lock."""
    nobody = f"http://127.0.0.1:{free_port()}"
    worker = Worker(aws.env("locktest", AWS_ENDPOINT_URL=nobody))
    try:
        outcome = worker.call({"name": lock, **args})
    finally:
        worker.close()
    assert not outcome.won
    assert re.match(
        rf"Could not {what} the deploy lock {re.escape(lock)}: Could not connect to the "
        rf"endpoint URL: .*\. Nothing was changed\.$",
        outcome.msg,
    ), outcome.msg


# A run whose every host is lost: ansible-playbook runs no further task of the play nor any later
# play, so the role's finish step never releases the lock; the greeter_lock_release callback
# (ansible.cfg) does, at the run's end, unless the lock is no longer this run's.
LOST_RUN = """
- name: Take the lock, then lose every host
  hosts: lost-1
  gather_facts: false
  tasks:
    - name: Take the fleet's deploy lock
      greeter_lock:
        name: "{{ lock }}"
        run_id: "{{ run_id }}"
        record: {user: ana, controller: laptop, action: deploy, version: v1, play: lost}
      delegate_to: localhost
      run_once: true
    - name: Another run breaks the lock meanwhile
      ansible.builtin.command:
        argv:
          - "{{ ansible_playbook_python }}"
          - -c
          - >-
            import boto3, json; boto3.client('ssm').put_parameter(Name='{{ lock }}',
            Value=json.dumps({'run_id': 'f' * 16}), Type='String', Overwrite=True)
      delegate_to: localhost
      run_once: true
      changed_when: true
      when: broken | bool
    - name: Every host is lost here
      ansible.builtin.ping:
- name: A last play, which ansible-playbook never runs after such a play
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Say so
      ansible.builtin.debug:
        msg: last play ran
"""


@pytest.mark.parametrize("broken", [False, True], ids=["held", "broken"])
def test_a_run_whose_every_host_is_lost_releases_its_lock_unless_another_run_holds_it(
    aws: Aws, lock: str, tmp_path: Path, broken: bool
) -> None:
    playbook = tmp_path / "lost.yml"
    playbook.write_text(LOST_RUN)
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(  # nothing listens on port 1: the host is unreachable at once
        "all:\n  hosts:\n    lost-1: {ansible_host: 127.0.0.1, ansible_port: 1}\n"
    )
    run_id = secrets.token_hex(8)
    env = aws.env("locktest", ANSIBLE_LIBRARY=str(REPO / "roles" / "greeter" / "library"))
    result = aws.run(
        "locktest", "ansible-playbook", "-i", str(inventory), str(playbook),
        "-e", f"lock={lock}", "-e", f"run_id={run_id}", "-e", f"broken={broken}", env=env,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 4, out  # 4: a host was unreachable
    assert "UNREACHABLE" in out and "last play ran" not in out, out
    parameters = aws.client("ssm").get_parameters(Names=[lock])["Parameters"]
    if broken:
        assert [json.loads(p["Value"])["run_id"] for p in parameters] == ["f" * 16], out
        assert f"is no longer run {run_id}'s (held by run {'f' * 16}); left as it is" in out, out
    else:
        assert parameters == [], out
        assert f"released the fleet's deploy lock {lock} of run {run_id}" in out, out
