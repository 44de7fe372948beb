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
    patch_server,
    quick_loss_env,
    release,
    releases,
    serves,
    switched,
    text,
    veth,
)
from support.ansible import recap

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
    codes = sorted(run.returncode for run in runs)
    assert codes[0] == 0 and codes[1] != 0, outputs
    refused = text(outputs[[run.returncode for run in runs].index(codes[1])])
    controller = socket.gethostname()
    assert re.search(
        rf"Another deploy holds the fleet's lock: \S+ on {re.escape(controller)}, "
        rf"version {lab_commit(fleet)}, started 20\d\d-\d\d-\d\dT[0-9:]+Z\. Nothing was changed",
        refused,
    ), refused[-3000:]
    assert "Read the host's deployment state" not in refused  # refused before touching a host


def test_a_stale_lock_is_broken_only_when_asked(fleet: LabSession) -> None:
    holder = json.dumps(
        {"token": "dead", "user": "ana", "controller": "laptop", "version": "v0.9",
         "started": "2026-01-01T00:00:00Z"}
    )  # fmt: skip
    fleet.ssh(
        fleet.hosts[0],
        f"sudo mkdir /opt/greeter/deploy.lock && echo '{holder}' "
        "| sudo tee /opt/greeter/deploy.lock/holder.json >/dev/null",
    )
    refused = deploy(fleet, check=False)
    assert refused.returncode != 0
    assert (
        "Another deploy holds the fleet's lock: ana on laptop, version v0.9, "
        "started 2026-01-01T00:00:00Z" in text(refused)
    ), text(refused)[-3000:]
    broke = deploy(fleet, "-e", "greeter_lock_break=true")
    assert "Broke the deploy lock" in text(broke)
    gone = fleet.ssh(fleet.hosts[0], "test ! -e /opt/greeter/deploy.lock", check=False)
    assert gone.returncode == 0


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
    assert "Every host serves one commit." in out
    assert releases(fleet) == before
    assert serves(fleet) == [served] * 3
    # Kept for debugging: the run ends with a mixed fleet and says who serves what.
    kept = deploy(fleet, *args, "-e", "greeter_revert_on_failure=false", check=False)
    out = text(kept)
    assert kept.returncode != 0
    assert f"greeter-1 serves {picky}, greeter-2 serves {served}, greeter-3 serves {served}" in out
    assert "The hosts do not all serve one commit" in out, out[-3000:]
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
