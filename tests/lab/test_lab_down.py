"""`lab down` leaves nothing behind: no mounts, namespaces, links, cgroups, processes or files.

Uses a lab of its own (beside the session's), which also shows that labs are independent.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.lab import prefixed

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import LabSession

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
NAME = "tdown"


def footprint(prefix: str, state: Path, name: str) -> dict[str, list[str]]:
    """Everything on the machine that carries this lab's names or lives under its state folder."""
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(state) in line.split()[4]
    ]
    netns = [n.name for n in Path("/run/netns").glob(f"{prefix}*")]
    links = [
        link["ifname"]
        for link in json.loads(
            subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
        )
        if link["ifname"].startswith(prefix)
    ]
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/greeter-lab/{prefix}*")]
    processes = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(state) in cmdline or f"_host {name} " in cmdline:
            processes.append(f"{proc.name}: {cmdline}")
    return {
        "mounts": mounts,
        "netns": netns,
        "links": links,
        "cgroups": cgroups,
        "processes": processes,
    }


def test_lab_down_leaves_nothing_behind(
    lab: LabSession, extra_lab: Callable[[str, int], LabSession], lab_cli: Callable
) -> None:
    session_bridge = lab.bridge
    tdown = extra_lab(NAME, 2)
    prefix, state = tdown.bridge, tdown.state
    try:
        up = footprint(prefix, state, tdown.name)
        assert len(up["mounts"]) == 3  # the hosts' tmpfs and an overlay per host
        assert len(up["netns"]) == 2
        assert len(up["links"]) == 3  # the bridge and one veth per host
        assert up["cgroups"]
        assert up["processes"]
        assert tdown.bridge != session_bridge
        assert tdown.subnet != lab.subnet
        saved = json.loads((state / "lab.json").read_text())
        pids = [pid for pid, _ in saved["processes"].values()]
    finally:
        started = time.monotonic()
        down = lab_cli(NAME, "down")
        elapsed = time.monotonic() - started
    assert down.returncode == 0, down.stderr
    assert footprint(prefix, state, tdown.name) == {
        "mounts": [],
        "netns": [],
        "links": [],
        "cgroups": [],
        "processes": [],
    }
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie_or_reused(pid), pid
    assert not state.exists()
    assert elapsed <= 10, f"teardown took {elapsed:.1f}s"
    # the session's lab is untouched
    assert lab.ssh(lab.hosts[0], "true").returncode == 0
    # and down on a lab that is not up is a harmless no-op
    again = lab_cli(NAME, "down")
    assert again.returncode == 0
    assert "not up" in again.stderr


def _zombie_or_reused(pid: int) -> bool:
    """A PID still present after down must belong to some other, newer process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True
    ours = (str(REPO / ".lab" / prefixed(NAME)), str(REPO / "lab" / "labctl"))
    return not any(mark in cmdline for mark in ours)


def test_lab_env_fails_clearly_when_the_lab_is_not_up(lab_cli: Callable) -> None:
    result = lab_cli("nosuchlab", "env")
    assert result.returncode == 1
    assert f"lab {prefixed('nosuchlab')} is not up" in result.stderr
    assert not (REPO / ".lab" / prefixed("nosuchlab")).exists()


def test_a_bad_lab_name_is_refused_before_anything_changes() -> None:
    env = dict(os.environ, LAB_NAME="Bad Name!")
    result = subprocess.run(
        [str(REPO / "lab" / "lab"), "up", "1"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 1
    assert "LAB_NAME='Bad Name!'" in result.stderr
    assert not (REPO / ".lab" / "Bad Name!").exists()
