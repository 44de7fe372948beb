"""The deploy on the other Debian releases the lab boots (LAB_DISTRO), one fresh lab each.

Debian 13 trixie (systemd 257, Python 3.13) stands above Ubuntu 24.04 (255, 3.12): the whole
site.yml with the front door (HAProxy 3.0 there, on a trixie balancer host) before the host, a
call through it, a changed=0 rerun, an upgrade drained and readied at the balancer, a rollback,
the unit's exposure, and the systemd >= 254 restart back-off, which grows there. Debian 11
bullseye (systemd 247, Python 3.9), the oldest release Debian's mirror still serves, is below what
the pinned service supports (grpcio 1.85 and protobuf 7 need Python 3.10, as Ubuntu 22.04 has)
and what the balancer role supports: both roles refuse it by name before changing anything.
Ubuntu cannot be booted here (the lab reaches only Debian's mirror).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from support.ansible import recap
from support.lab import output

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab

MAX_EXPOSURE = 1.5

# The first test of each release pays for its lab: on a fresh machine that includes building the
# release's image (about 3 min on a quiet machine, several under load) and a first deploy.
FIRST_ON_A_RELEASE = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def trixie(extra_lab: Callable[..., LabSession]) -> LabSession:
    """One trixie host and a trixie balancer host in front of it."""
    return extra_lab("trixie", 1, balancer=True, distro="trixie")


def served_commit(lab: LabSession) -> str:
    result = lab.run("greeter", "probe", f"{lab.hosts[0].address}:50051", "--json")
    return json.loads(result.stdout)[0]["commit"]


def new_commit(lab: LabSession, label: str) -> str:
    """An empty commit on the mirror's main, made inside the lab's own mirror."""
    git = ["git", "-C", str(lab.git_mirror)]
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }

    def out(*args: str) -> str:
        return subprocess.run(
            [*git, *args], check=True, capture_output=True, text=True, env=env
        ).stdout.strip()

    commit = out("commit-tree", "main^{tree}", "-p", "main", "-m", f"test: {label}")
    out("update-ref", f"refs/heads/test-{label}", commit)
    return commit


def task_output(stdout: str, name: str) -> str:
    """What ansible-playbook printed under the task `name` (the first such task)."""
    return stdout[stdout.index(f"{name}] ") :].split("\nTASK [", maxsplit=1)[0]


@FIRST_ON_A_RELEASE
def test_trixie_first_site_serves_through_the_front_door_and_a_rerun_changes_nothing(
    trixie: LabSession,
) -> None:
    host, lb = trixie.hosts[0], trixie.balancer
    assert lb is not None
    release = trixie.ssh(host, ". /etc/os-release; echo $VERSION_CODENAME; python3 -V").stdout
    assert release.split()[:2] == ["trixie", "Python"], release
    assert release.split()[2].startswith("3.13"), release
    first = trixie.playbook("site.yml")
    assert served_commit(trixie) == trixie.commit
    # The probe's table: the front door first, SERVING, and the host UP at the balancer.
    table = task_output(first.stdout, "Show the table")
    front = f"{lb.address}:50051"
    assert re.search(rf"{re.escape(front)}\s+yes\s+SERVING.*front-door", table), table
    assert re.search(rf"{re.escape(host.address)}:50051\s+yes\s+SERVING.*\sUP", table), table
    hello = trixie.run("greeter", "hello", front, "Teste")
    assert hello.stdout.strip() == "Olá, Teste!"
    # Debian 13's HAProxy, and it takes the role's configuration without a warning (a
    # deprecated or removed directive would be one).
    assert trixie.ssh(lb, "/usr/sbin/haproxy -v").stdout.startswith("HAProxy version 3.0."), lb
    check = trixie.ssh(lb, "sudo haproxy -c -V -f /etc/haproxy/haproxy.cfg 2>&1")
    assert "Configuration file is valid" in check.stdout, check.stdout
    assert "WARNING" not in check.stdout and "ALERT" not in check.stdout, check.stdout
    again = trixie.playbook("site.yml")
    counters = recap(again.stdout)
    assert counters[host.name]["changed"] == 0, again.stdout[-3000:]
    assert counters[lb.name]["changed"] == 0, again.stdout[-3000:]


def test_trixie_upgrade_drains_at_the_front_door_then_rollback(trixie: LabSession) -> None:
    upgrade = new_commit(trixie, "trixie-upgrade")
    result = trixie.playbook("playbooks/deploy.yml", "-e", f"greeter_version={upgrade}")
    assert served_commit(trixie) == upgrade
    # HAProxy 3.0's runtime API took the host out (drain) and back (ready, once its check passed).
    at_lb = f"changed: [{trixie.hosts[0].name} -> {trixie.balancer.name}"
    for state in ("drain", "ready"):
        done = task_output(result.stdout, f"Set the host at the balancer to {state}")
        assert at_lb in done, done
    trixie.playbook("playbooks/rollback.yml")
    assert served_commit(trixie) == trixie.commit


def test_trixie_unit_exposure_is_at_most_1_5(trixie: LabSession) -> None:
    report = trixie.ssh(
        trixie.hosts[0], "sudo systemd-analyze security greeter.service --no-pager"
    ).stdout
    match = re.search(r"Overall exposure level for greeter\.service: (\d+\.\d+)", report)
    assert match, report[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, report


# On the host: kill the service's main process three times, each time once it is back, and print
# how long systemd waited before each restart (CLOCK_MONOTONIC, as systemd's timestamps).
RESTART_DELAYS = """sudo python3 - <<'EOF'
import os, signal, subprocess, time
def show(prop):
    return subprocess.run(["systemctl", "show", "-p", prop, "--value", "greeter.service"],
                          capture_output=True, text=True, check=True).stdout.strip()
delays = []
for _ in range(3):
    started = show("ExecMainStartTimestampMonotonic")
    os.kill(int(show("MainPID")), signal.SIGKILL)
    killed = time.monotonic()
    while show("ExecMainStartTimestampMonotonic") == started or show("ActiveState") != "active":
        time.sleep(0.05)
    delays.append(int(show("ExecMainStartTimestampMonotonic")) / 1e6 - killed)
print(" ".join(f"{d:.2f}" for d in delays), show("RestartUSec"), show("NRestarts"))
EOF"""


def test_trixie_restart_back_off_grows(trixie: LabSession) -> None:
    """systemd >= 254 renders RestartSteps/RestartMaxDelaySec: 2 s, then ~3.4 s, then ~5.9 s."""
    host = trixie.hosts[0]
    unit = trixie.ssh(host, "systemctl cat greeter.service").stdout
    assert "RestartSteps=5" in unit, unit
    fields = trixie.ssh(host, RESTART_DELAYS).stdout.split()
    first, second, third = (float(d) for d in fields[:3])
    assert first >= 2, fields  # RestartSec
    assert second > first * 1.3, fields
    assert third > second * 1.3, fields
    trixie.playbook("playbooks/deploy.yml")  # leaves it as the role wants it


@FIRST_ON_A_RELEASE
def test_bullseye_is_refused_by_name_before_anything_changes(
    extra_lab: Callable[..., LabSession],
) -> None:
    bullseye = extra_lab("bullseye", 1, balancer=True, distro="bullseye", busy_boot=0)
    host = bullseye.hosts[0]
    result = bullseye.playbook("playbooks/deploy.yml", check=False)
    text = " ".join(output(result).split())
    assert result.returncode != 0, text[-3000:]
    assert re.search(
        r"this host is debian 11 \(bullseye\) with Python 3\.9 and systemd 247\. "
        r"Nothing was changed",
        text,
    ), text[-3000:]
    # Nothing under /opt/greeter (the deploy lock is an SSM parameter, not a folder on a host).
    empty = bullseye.ssh(host, 'test -z "$(sudo ls -A /opt/greeter 2>/dev/null)"', check=False)
    assert empty.returncode == 0, bullseye.ssh(host, "sudo ls -laR /opt/greeter", check=False)
    assert bullseye.ssh(host, "dpkg -s python3-venv", check=False).returncode != 0
    # The balancer role too, by name, before HAProxy is installed.
    lb = bullseye.playbook("playbooks/balancer.yml", check=False)
    text = " ".join(output(lb).split())
    assert lb.returncode != 0, text[-3000:]
    assert re.search(
        r"greeter_lb supports debian 12, debian 13, ubuntu 22\.04, ubuntu 24\.04 .*; "
        r"this host is debian 11 \(bullseye\)\. Nothing was changed",
        text,
    ), text[-3000:]
    assert recap(lb.stdout)[bullseye.balancer.name]["changed"] == 0
    assert bullseye.ssh(bullseye.balancer, "dpkg -s haproxy", check=False).returncode != 0
