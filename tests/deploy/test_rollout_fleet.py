"""Rollout safety on 3 lab hosts: lost and failed hosts, batches, revert, one deploy at a time,
history.

One lab (``ro-fleet``) shared by these tests in file order, each starting from the fleet the
previous one left. Each fails on the role before issue 11.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rollout_support import (
    RELEASE,
    REPO,
    STARTS_ON_GREETER_1_ONLY,
    deploy,
    history,
    lab_commit,
    lock_holder,
    lock_name,
    patch_server,
    quick_loss_env,
    release,
    releases,
    run_id,
    serves,
    ssm,
    switched,
    text,
    veth,
)
from support.ansible import recap
from support.lock_module import Worker

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab

# --- lab 2: what a run does to a fleet of 3 -----------------------------------------------------

PREPARED: dict[str, str] = {}  # the commit the preparing tests deploy


@pytest.fixture(scope="module")
def fleet(extra_lab: Callable[[str, int], LabSession]) -> LabSession:
    """Three hosts serving the lab's commit."""
    lab = extra_lab("ro-fleet", 3)
    lab.playbook("playbooks/provision.yml")
    deploy(lab)
    return lab


def test_two_deploys_started_together_exactly_one_proceeds(fleet: LabSession) -> None:
    args = ["ansible-playbook", "playbooks/deploy.yml"]
    runs = [
        subprocess.Popen(args, cwd=REPO, env=fleet.env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, outputs
    winner = run_id(outputs[codes.index(0)])
    refused = text(outputs[1 - codes.index(0)])
    controller = socket.gethostname()
    # The loser names the winner: its run id, user@controller, what and which version, its age.
    name = re.escape(lock_name(fleet))
    assert re.search(
        rf"Another run holds the fleet's deploy lock \(SSM parameter {name}\): "
        rf"run {winner} of \S+@{re.escape(controller)}: deploy of {lab_commit(fleet)} "
        rf"\(play \"Deploy in rolling batches behind the health gate\"\), "
        rf"taken 20\d\d-\d\d-\d\dT[0-9:]+Z, \d+ s ago\. Nothing was changed",
        refused,
    ), refused[-3000:]
    assert f"-e greeter_lock_break={winner}" in refused
    assert "Read the host's deployment state" not in refused  # refused before touching a host
    assert lock_holder(fleet) is None  # the winner released it


DEAD = {"run_id": "dead0000deadbeef", "user": "ana", "controller": "laptop", "action": "deploy",
        "version": "v0.9", "play": "Deploy", "time": "2026-01-01T00:00:00Z"}  # fmt: skip


def test_a_stale_lock_is_broken_only_when_asked(fleet: LabSession) -> None:
    """A killed run's lock refuses deploys and rollbacks alike; greeter_lock_break=true no longer
    breaks anything; naming the dead run's id does."""
    ssm(fleet).put_parameter(Name=lock_name(fleet), Value=json.dumps(DEAD), Type="String")
    held = r"run dead0000deadbeef of ana@laptop: deploy of v0\.9 \(play \"Deploy\"\), taken "
    for playbook in ("playbooks/deploy.yml", "playbooks/rollback.yml"):
        refused = fleet.playbook(playbook, check=False)
        assert refused.returncode != 0
        out = text(refused)
        assert re.search(held + r"2026-01-01T00:00:00Z, \d+ s ago\. Nothing was changed", out), out[
            -3000:
        ]
        assert "-e greeter_lock_break=dead0000deadbeef" in out
        assert "Read the host's deployment state" not in out
    unnamed = deploy(fleet, "-e", "greeter_lock_break=true", check=False)
    assert unnamed.returncode != 0
    assert "greeter_lock_break must be empty, 'stale' or the run id" in text(unnamed)
    assert lock_holder(fleet) == DEAD
    broke = deploy(fleet, "-e", "greeter_lock_break=dead0000deadbeef")
    assert re.search(
        r"Broke the deploy lock of " + held + r".* \(greeter_lock_break=dead0000deadbeef\)",
        text(broke),
    ), text(broke)[-3000:]
    assert lock_holder(fleet) is None


def test_with_the_first_host_down_a_deploy_of_the_others_takes_the_lock_and_succeeds(
    fleet: LabSession, tmp_path: Path
) -> None:
    """Issue 22: the lock was a folder on greeter-1, so its loss blocked every deploy."""
    link = veth(fleet, 0)
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        result = fleet.playbook(
            "playbooks/deploy.yml", "--limit", "greeter_servers:!greeter-1",
            env=quick_loss_env(fleet, tmp_path), check=False,
        )  # fmt: skip
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    assert result.returncode == 0, text(result)[-3000:]
    run_id(result.stdout)
    assert set(recap(result.stdout)) == {"greeter-2", "greeter-3"}
    assert lock_holder(fleet) is None


BREAKER = "b0000000000000be"


def test_a_run_whose_lock_is_broken_stops_before_its_next_batch_and_touches_nothing_more(
    fleet: LabSession,
) -> None:
    """Another run breaks this one's lock while its first batch bakes: it must not switch the
    next batch, nor put the first back (the breaker may be changing the fleet now)."""
    before = releases(fleet)
    breaker = Worker(fleet.env)  # warm before the race: the break must land inside the bake
    args = ["ansible-playbook", "playbooks/deploy.yml", "-e", '{"greeter_serial": [1]}',
            "-e", '{"greeter_extra_env": {"GREETER_LOCK_TEST": "1"}}',  # a config-only release
            "-e", "greeter_bake_seconds=10"]  # fmt: skip
    lines: list[str] = []
    broken = None
    try:
        with subprocess.Popen(
            args,
            cwd=REPO,
            env=fleet.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as play:
            assert play.stdout is not None
            for line in play.stdout:
                lines.append(line)
                if broken is None and line.startswith("TASK [greeter : Switch current"):
                    held = lock_holder(fleet)
                    assert held is not None
                    broken = breaker.call(
                        {"name": lock_name(fleet), "run_id": BREAKER, "break_lock": held["run_id"],
                         "record": {"user": "bo", "controller": "ci"}}
                    )  # fmt: skip
            rc = play.wait(timeout=600)
        output = "".join(lines)
        out = text(output)
        assert broken is not None and broken.won, broken
        assert rc != 0, out[-3000:]
        assert switched(output) == [["greeter-1"]], out[-3000:]
        assert re.search(
            rf"This run's deploy lock \(run {held['run_id']}, SSM parameter "
            rf"{re.escape(lock_name(fleet))}\) was broken: it is now held by run b0000000000000be "
            r"of bo@ci.*This run stopped at once and changed nothing more \(no host was put back\)",
            out,
        ), out[-3000:]
        now = releases(fleet)
        assert now[0] != before[0] and now[1:] == before[1:]  # greeter-1 kept, none put back
        assert lock_holder(fleet)["run_id"] == BREAKER  # not the broken run's to delete
        print(f"\n[lock] broken run: {len(switched(output))} batch switched, then stopped")
    finally:
        breaker.call({"name": lock_name(fleet), "run_id": BREAKER, "state": "absent"})
        breaker.close()
    deploy(fleet)  # greeter-1 back to the fleet's configuration
    assert releases(fleet) == before


def test_a_host_unreachable_while_preparing_stops_every_host_before_any_switch(
    fleet: LabSession, tmp_path: Path
) -> None:
    before = releases(fleet)
    new = fleet.push_commit(tmp_path, "Upgrade")
    PREPARED["commit"] = new  # built on greeter-1 and greeter-2 by this run: the next test's
    link = veth(fleet, 2)
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        result = fleet.run("ansible-playbook", "playbooks/deploy.yml", "-e",
                           f"greeter_version={new}", check=False)  # fmt: skip
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    out = text(result)
    assert result.returncode != 0
    assert "greeter-3: lost while preparing, before any host switched" in out, out[-3000:]
    assert recap(result.stdout)["greeter-3"]["unreachable"] == 1
    assert switched(result.stdout) == []
    assert releases(fleet)[:2] == before[:2]
    time.sleep(2)
    assert serves(fleet) == [lab_commit(fleet)] * 3


# greeter-3's build folder becomes a tmpfs with 16 MiB free: too little for a build.
FILL = (
    "set -e; used=$(du -sm /opt/greeter/builds | cut -f1); mkdir -p /mnt/rollout-full; "
    "mount -t tmpfs -o size=$((used + 16))m,mode=0755 rollout-full /mnt/rollout-full; "
    "cp -a /opt/greeter/builds/. /mnt/rollout-full/; "
    "mount --bind /mnt/rollout-full /opt/greeter/builds; umount -l /mnt/rollout-full"
)


def test_a_host_failing_while_preparing_stops_every_host_before_any_switch(
    fleet: LabSession,
) -> None:
    """The commit of the test above is built on greeter-1 and greeter-2, which would switch at
    once; greeter-3 must build it and fails its free-space check: nobody switches."""
    before = releases(fleet)
    fleet.ssh(fleet.hosts[2], f"sudo sh -c '{FILL}'")
    try:
        result = deploy(fleet, "-e", f"greeter_version={PREPARED['commit']}", check=False)
    finally:
        fleet.ssh(fleet.hosts[2], "sudo umount -l /opt/greeter/builds")
    out = text(result)
    assert result.returncode != 0
    assert re.search(
        r"greeter-3: failed to prepare \((?:greeter : )?Check the free space for a new release: "
        r"/opt/greeter/builds has \d+ MiB free",
        out,
    ), out[-3000:]
    assert switched(result.stdout) == []
    assert releases(fleet) == before
    assert serves(fleet) == [lab_commit(fleet)] * 3


def test_a_host_lost_in_a_batch_of_2_stops_the_rollout_after_that_batch(
    fleet: LabSession, tmp_path: Path
) -> None:
    before = releases(fleet)
    new = fleet.push_commit(tmp_path, "Upgrade, a second time")
    link = veth(fleet, 1)
    args = ["ansible-playbook", "playbooks/deploy.yml", "-e", f"greeter_version={new}",
            "-e", '{"greeter_serial": [2, 1]}']  # fmt: skip
    lines: list[str] = []
    down = False
    with subprocess.Popen(args, cwd=REPO, env=quick_loss_env(fleet, tmp_path), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as play:  # fmt: skip
        assert play.stdout is not None
        for line in play.stdout:
            lines.append(line)
            # The first batch (greeter-1, greeter-2) starts switching: greeter-2 goes away.
            if not down and line.startswith("TASK [greeter : Switch current"):
                subprocess.run(["ip", "link", "set", link, "down"], check=True)
                down = True
        rc = play.wait(timeout=600)
    subprocess.run(["ip", "link", "set", link, "up"], check=True)
    output = "".join(lines)
    out = text(output)
    assert rc != 0
    assert "greeter-2: lost during the rollout" in out, out[-3000:]
    assert recap(output)["greeter-2"]["unreachable"] == 1
    # greeter-3 (the next batch) was never touched; greeter-1 switched and was put back.
    assert all("greeter-3" not in batch for batch in switched(output))
    assert release(fleet, 2) == before[2]
    assert release(fleet, 0) == before[0]
    assert "greeter-1: the run stopped after this host switched" in out, out[-3000:]
    time.sleep(2)
    deploy(fleet, "-e", f"greeter_version={new}")
    assert serves(fleet) == [new] * 3


def test_a_second_batch_failing_puts_the_first_back_unless_told_to_keep_it(
    fleet: LabSession, tmp_path: Path
) -> None:
    before = releases(fleet)
    served = serves(fleet)[0]
    picky = fleet.push_commit(tmp_path, "greeter-1 only", patch_server(STARTS_ON_GREETER_1_ONLY))
    args = ("-e", f"greeter_version={picky}", "-e", '{"greeter_serial": [1, 2]}',
            "-e", "greeter_verify_timeout=5")  # fmt: skip
    result = deploy(fleet, *args, check=False)
    out = text(result)
    assert result.returncode != 0
    assert switched(result.stdout) == [["greeter-1"], ["greeter-2", "greeter-3"]]
    reverted = (
        rf"greeter-1: the run stopped after this host switched to {picky}-[0-9a-f]{{12}}; "
        rf"reverted to {before[0]}, which serves again"
    )
    assert re.search(reverted, out), out[-3000:]
    assert f"Every host serves release {before[0]}." in out, out[-3000:]
    assert releases(fleet) == before
    assert serves(fleet) == [served] * 3
    # Kept for debugging: the run ends with a mixed fleet and says who serves what.
    kept = deploy(fleet, *args, "-e", "greeter_revert_on_failure=false", check=False)
    out = text(kept)
    assert kept.returncode != 0
    fleet_now = (
        rf"greeter-1 serves {picky}-[0-9a-f]{{12}}, greeter-2 serves {before[1]}, "
        rf"greeter-3 serves {before[2]}\."
    )
    assert re.search(fleet_now, out), out[-3000:]
    assert "The hosts do not all serve one release" in out, out[-3000:]
    assert serves(fleet) == [picky, served, served]
    deploy(fleet, "-e", f"greeter_version={served}")
    assert serves(fleet) == [served] * 3


def test_the_history_records_every_activation_rollback_and_revert(fleet: LabSession) -> None:
    entries = history(fleet, 0)
    assert [e["action"] for e in entries].count("revert") >= 1
    assert {"activated", "reverted"} <= {e["outcome"] for e in entries}
    controller = socket.gethostname()
    for entry in entries:
        assert re.fullmatch(r"20\d\d-\d\d-\d\dT[0-9:]+Z", entry["time"])
        assert entry["operator"].endswith(f"@{controller}")
        assert re.fullmatch(RELEASE, entry["to"]) and entry["config"] == entry["to"][41:]
    # Append-only: a rollback appends one line on each host it returns and keeps every earlier
    # line; the line says from which release to which the host went, and how it ended. The lab's
    # first release is still on the hosts where newer ones did not push it out (greeter-1 switched
    # in more runs above, so greeter_keep_releases pruned its oldest): those go back to it.
    commit = lab_commit(fleet)
    names = [fleet.ssh(host, "ls /opt/greeter/releases").stdout.split() for host in fleet.hosts]
    back = [i for i in range(3) if any(name.startswith(f"{commit}-") for name in names[i])]
    assert len(back) >= 2, names
    before = [history(fleet, i) for i in range(3)]
    was = releases(fleet)
    limit = ",".join(fleet.hosts[i].name for i in back)
    fleet.playbook(
        "playbooks/rollback.yml", "-e", f"greeter_rollback_to={commit}", "--limit", limit
    )
    now = releases(fleet)
    for index, earlier in enumerate(before):
        after = history(fleet, index)
        assert after[: len(earlier)] == earlier
        if index not in back:  # not in the run: nothing changed, nothing recorded
            assert (after, now[index]) == (earlier, was[index])
            continue
        assert now[index][:40] == commit and now[index] != was[index], (now, was)
        assert len(after) == len(earlier) + 1, after[len(earlier) :]
        last = after[-1]
        assert (last["action"], last["from"], last["to"], last["outcome"], last["serving"]) == (
            "rollback", was[index], now[index], "activated", now[index]
        ), last  # fmt: skip
        assert last["config"] == now[index][41:] and last["host"] == f"greeter-{index + 1}"
    logs = text(fleet.playbook("playbooks/logs.yml", "-e", "greeter_history_lines=4"))
    shown = re.findall(rf"(greeter-\d) rollback ({RELEASE}) -> ({RELEASE}): activated", logs)
    assert sorted(shown) == [(f"greeter-{i + 1}", was[i], now[i]) for i in back], logs[-3000:]
    # The probe playbook shows each host's release and since when, from its history.
    probe_out = text(fleet.playbook("playbooks/probe.yml"))
    for index in range(3):
        how = "rollback" if index in back else "deploy"
        assert re.search(rf"{now[index]} since 20\d\d-\d\d-\d\dT[0-9:]+Z \({how} by ", probe_out), (
            probe_out[-3000:]
        )
