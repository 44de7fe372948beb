"""The front door through incidents, on a lab of its own (3 backends + the balancer host, LAB_NAME
``incid``): a release failing its gate, a last batch failing, a host lost after it switched, a
backend left drained, the controller killed between drain and ready. Each test starts from a
fleet serving one release, all UP, and leaves it so; a plain client (ONE channel, retries
disabled) calls through the balancer throughout, and HAProxy's own counters show the drains.
The other front-door suite (test_frontdoor.py) builds the front door and upgrades it.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from front_support import (
    BACKENDS,
    REPO,
    Counters,
    PlainClient,
    at_balancer,
    drained_through_restart,
    probe_rows,
    restart_window,
    set_at_balancer,
    wait_all_up,
)
from support.ansible import recap, with_ssh_options
from support.watchdog import kill_tree

if TYPE_CHECKING:
    from support.lab import LabSession

pytestmark = pytest.mark.lab

LAB_NAME = os.environ.get("LAB_FRONTDOOR_INCIDENTS_NAME", "incid")


def reverted(name: str, commit: str) -> str:
    """The finish step's line for a host put back after the run stopped (a regex)."""
    return (
        rf"{name}: the run stopped after this host switched to {commit}-[0-9a-f]{{12}}; "
        r"reverted to [0-9a-f]{40}-[0-9a-f]{12}, which serves again"
    )


@pytest.fixture(scope="module")
def fleet(extra_lab: Callable[..., LabSession]) -> Iterator[LabSession]:
    """Three lab backends and the balancer host, the front door built by site.yml."""
    lab = extra_lab(LAB_NAME, 3, balancer=True)
    lab.playbook("site.yml")
    yield lab


# Runs on the balancer host: each change of a server's status at the balancer ("time status"),
# sampled every 50 ms, until its stdin closes.
STATUS_TIMELINE = """
import csv, io, select, socket, sys, time
def status():
    s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock')
    s.sendall(b'show stat\\n'); text = s.makefile().read().lstrip('# ')
    return {r['svname']: r['status'] for r in csv.DictReader(io.StringIO(text))}[sys.argv[1]]
print('watching', flush=True)
last = None
while not select.select([sys.stdin], [], [], 0.05)[0] or sys.stdin.read(1):
    now = status()
    if now != last:
        print(time.time(), now, flush=True); last = now
"""


def test_a_host_failing_its_gate_stays_out_of_rotation_until_its_rollback_serves(
    fleet: LabSession, tmp_path: Path
) -> None:
    """A release that passes the balancer's health check but not the gate (a wrong greeting): the
    plain client never gets an answer from it, and the host returns to rotation once, after its
    rollback serves again."""
    wait_all_up(fleet, BACKENDS)
    good = {row["commit"] for row in probe_rows(fleet)[1]}
    assert len(good) == 1, good

    def wrong_greeting(clone: Path) -> None:
        server = clone / "service" / "src" / "greeter" / "server.py"
        text = server.read_text()
        assert 'f"Olá, {nome}!"' in text
        server.write_text(text.replace('f"Olá, {nome}!"', 'f"Oi, {nome}!"'))

    bad = fleet.push_commit(tmp_path, "A release with another greeting", wrong_greeting)
    watcher = subprocess.Popen(
        [str(REPO / "lab" / "lab"), "ssh", fleet.balancer.name,
         f"sudo python3 -c {shlex.quote(STATUS_TIMELINE)} greeter-1"],
        env=fleet.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watcher.stdout.readline().strip() == "watching"
        with PlainClient(fleet) as plain:
            time.sleep(2)
            result = fleet.playbook(
                "playbooks/deploy.yml", "-e", f"greeter_version={bad}",
                "-e", "greeter_verify_timeout=5", check=False,
            )  # fmt: skip
            time.sleep(2)
    finally:
        out, _ = watcher.communicate(timeout=30)  # closes its stdin: the watcher ends
    timeline = [line.split(maxsplit=1)[1] for line in out.splitlines()]
    output = " ".join((result.stdout + result.stderr).split())
    print(f"\n[frontdoor] greeter-1 at the balancer: {' -> '.join(timeline)}", flush=True)
    assert result.returncode != 0
    assert re.search(rf"greeter-1: release {bad}-[0-9a-f]{{12}} failed \(", output), output[-3000:]
    assert "which serves again" in output, output[-3000:]
    # Out of rotation from the drain to the end of its rollback: UP once before, once after.
    up = [state.startswith("UP") for state in timeline]  # "UP", "UP 1/3" (going down), ...
    assert up[0] and up[-1], timeline
    assert sum(1 for before, now in itertools.pairwise(up) if now and not before) == 1, timeline
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed", flush=True)
    assert plain.failures == [], plain.failures[:10]  # no error and no "Oi" reached it
    assert plain.report["ok"] > 200
    assert {row["commit"] for row in probe_rows(fleet)[1]} == good


STARTS_EXCEPT_ON_GREETER_3 = """


_every_host_main = main


def main(argv=None):  # a release that does not start on greeter-3
    import socket

    if socket.gethostname() == "greeter-3":
        raise SystemExit("this release does not start on greeter-3")
    return _every_host_main(argv)
"""


def test_a_rollout_whose_last_batch_fails_goes_back_batch_by_batch_through_the_front_door(
    fleet: LabSession, tmp_path: Path
) -> None:
    """Batches of one; greeter-3, the last, fails its gate and goes back itself; the run then puts
    greeter-1 and greeter-2 back one at a time, each drained at the balancer before its restart
    and readied after its gate: a plain client through the front door loses no call, and HAProxy's
    counters show no new call reached a host while it restarted (issue 22)."""
    wait_all_up(fleet, BACKENDS)
    good = {row["commit"] for row in probe_rows(fleet)[1]}
    assert len(good) == 1, good

    def fails_on_greeter_3(clone: Path) -> None:
        server = clone / "service" / "src" / "greeter" / "server.py"
        server.write_text(server.read_text() + STARTS_EXCEPT_ON_GREETER_3)

    bad = fleet.push_commit(tmp_path, "A release that fails on greeter-3", fails_on_greeter_3)
    with Counters(fleet) as counters, PlainClient(fleet) as plain:
        time.sleep(2)
        started = time.monotonic()
        result = fleet.playbook(
            "playbooks/deploy.yml", "-e", f"greeter_version={bad}", "-e", '{"greeter_serial": [1]}',
            "-e", "greeter_verify_timeout=5", check=False,
        )  # fmt: skip
        took = time.monotonic() - started
        time.sleep(2)
    output = " ".join((result.stdout + result.stderr).split())
    print(f"\n[frontdoor timing] rollout, last batch failed, reverted: {took:.1f} s", flush=True)
    assert result.returncode != 0
    assert re.search(rf"greeter-3: release {bad}-[0-9a-f]{{12}} failed \(", output), output[-3000:]
    for name in ("greeter-1", "greeter-2"):
        assert re.search(reverted(name, bad), output), output[-3000:]
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed", flush=True)
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 200
    # Each host's last restart is its revert (greeter-3's, its own rollback): drained throughout.
    for name in BACKENDS:
        print(f"[frontdoor] {drained_through_restart(fleet, counters, name)}", flush=True)
    # The revert's batches are the rollout's: never two backends out of rotation at once, and
    # greeter-1 back and ready before greeter-2 leaves.
    assert counters.most_out_at_once() == 1
    assert restart_window(fleet, "greeter-1")[1] < restart_window(fleet, "greeter-2")[0]
    assert {row["commit"] for row in probe_rows(fleet)[1]} == good


def test_a_host_lost_after_it_switched_stops_the_run_and_the_others_go_back_through_the_front_door(
    fleet: LabSession, tmp_path: Path
) -> None:
    """greeter-1 switches and passes; its link goes down while greeter-2's batch runs. No later
    batch task touches greeter-1, yet the run must notice it, name it, and put greeter-2 and
    greeter-3 back, each drained at the balancer around its restart (issue 22)."""
    wait_all_up(fleet, BACKENDS)
    good = {row["commit"] for row in probe_rows(fleet)[1]}
    assert len(good) == 1, good
    new = fleet.push_commit(tmp_path, "An upgrade that loses greeter-1")
    link = fleet.hosts[0].veth
    env = with_ssh_options(fleet.env, "-o", "ServerAliveInterval=2")
    env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(tmp_path / "cp")  # fresh masters with that option
    args = ["ansible-playbook", "playbooks/deploy.yml", "-e", f"greeter_version={new}",
            "-e", '{"greeter_serial": [1]}']  # fmt: skip
    lines: list[str] = []
    switches, lost_at = 0, 0.0
    try:
        with Counters(fleet) as counters, PlainClient(fleet) as plain:
            time.sleep(2)
            started = time.monotonic()
            with subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) as play:  # fmt: skip
                assert play.stdout is not None
                for line in play.stdout:
                    lines.append(line)
                    if line.startswith("TASK [greeter : Switch current"):
                        switches += 1
                        if switches == 2:  # greeter-1's batch passed, greeter-2's begins
                            lost_at = time.time()
                            subprocess.run(["ip", "link", "set", link, "down"], check=True)
                rc = play.wait(timeout=600)
            took = time.monotonic() - started
            time.sleep(2)
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    output = " ".join("".join(lines).split())
    print(
        f"\n[frontdoor timing] rollout losing a switched host, reverted: {took:.1f} s", flush=True
    )
    assert lost_at, output[-3000:]
    assert rc != 0
    assert recap("".join(lines))["greeter-1"]["unreachable"] == 1
    assert "greeter-1: lost during the rollout" in output, output[-3000:]
    for name in ("greeter-2", "greeter-3"):
        assert re.search(reverted(name, new), output), output[-3000:]
        print(f"[frontdoor] {drained_through_restart(fleet, counters, name)}", flush=True)
    # Only calls on their way to greeter-1 when its link went down can fail (a 5 s deadline, and
    # at most 3 s until the balancer takes it out); none during the reverts.
    late = [f for f in plain.failures if f[0] > lost_at + 3]
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed "
          f"(all within 3 s of the loss: {not late})", flush=True)  # fmt: skip
    assert late == [], late[:10]
    assert plain.report["ok"] > 200
    # The lost host kept the new release (nothing could put it back); the others serve the old.
    wait_all_up(fleet, BACKENDS, timeout=60)
    rows = {row["target"].split(":")[0]: row["commit"] for row in probe_rows(fleet)[1]}
    assert [rows[host.address] for host in fleet.hosts] == [new, *good, *good], rows
    # The rerun of the fleet's release puts greeter-1 back.
    fleet.playbook("playbooks/deploy.yml", "-e", f"greeter_version={next(iter(good))}")
    assert {row["commit"] for row in probe_rows(fleet)[1]} == good
    wait_all_up(fleet, BACKENDS)


def test_a_backend_left_drained_is_put_back_by_the_next_deploy_saying_why(
    fleet: LabSession,
) -> None:
    """What a run interrupted between drain and ready leaves: a host serving the wanted release,
    drained at the balancer. The next deploy (nothing else to change) puts it back first,
    reports it changed and says why; the other hosts stay unchanged."""
    wait_all_up(fleet, BACKENDS)
    set_at_balancer(fleet, "greeter-2", "drain")
    assert at_balancer(fleet)["greeter-2"]["status"] == "DRAIN"
    result = fleet.playbook("playbooks/deploy.yml")
    output = " ".join(result.stdout.split())
    counters = recap(result.stdout)
    assert counters["greeter-2"]["changed"] > 0, output[-3000:]
    assert counters["greeter-1"]["changed"] == counters["greeter-3"]["changed"] == 0
    why = (
        r"greeter-2 serves the wanted release [0-9a-f]{40}-[0-9a-f]{12} but the balancer "
        r"holds it out \(DRAIN at greeter-lb\)"
    )
    assert re.search(why, output), output[-3000:]
    assert at_balancer(fleet)["greeter-2"]["status"].startswith("UP")


def test_a_run_killed_between_drain_and_ready_and_its_rerun_fail_no_call(
    fleet: LabSession, tmp_path: Path
) -> None:
    """The controller's ansible-playbook is killed once the first host is drained at the
    balancer; the rerun (breaking the killed run's lock by its id) ends with every host on the
    new release and in rotation. A plain client calls through both runs without a failure."""
    wait_all_up(fleet, BACKENDS)
    new = fleet.push_commit(tmp_path, "a run killed mid-rollout")
    deploy = ["ansible-playbook", "playbooks/deploy.yml", "-e", f"greeter_version={new}"]
    with PlainClient(fleet) as plain:
        time.sleep(2)
        started = time.monotonic()
        killed = subprocess.Popen(
            deploy, cwd=REPO, env={**fleet.env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            # Out of rotation (DRAIN, or DOWN once it restarts): the run is between drain and ready.
            while at_balancer(fleet)["greeter-1"]["status"].startswith("UP"):
                assert killed.poll() is None, "the run ended before it drained greeter-1"
                assert time.monotonic() - started < 600
                time.sleep(0.2)
        finally:
            # The controller and every worker it forked (they call setsid: not in its group).
            kill_tree(killed.pid)
        out, _ = killed.communicate(timeout=60)
        left = at_balancer(fleet)["greeter-1"]["status"]
        said = " ".join(out.split())  # the YAML callback folds long lines
        run_id = re.search(r"This is run (\S+); it holds the deploy lock", said)
        assert run_id, out[-3000:]
        time.sleep(2)
        rerun = fleet.playbook(*deploy[1:], "-e", f"greeter_lock_break={run_id[1]}")
        took = time.monotonic() - started
        time.sleep(2)
    calls = plain.report["ok"] + len(plain.failures)
    print(
        f"\n[frontdoor] killed run (greeter-1 left {left}) and its rerun ({took:.1f} s): "
        f"plain client {calls} calls, {len(plain.failures)} failed",
        flush=True,
    )
    assert left != "UP" and not left.startswith("UP"), left
    assert recap(rerun.stdout)["greeter-1"]["changed"] > 0
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 200
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    assert {row["commit"] for row in rows} == {new}
    wait_all_up(fleet, BACKENDS)
