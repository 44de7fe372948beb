"""Session fixtures for tests that run on lab hosts (see lab/README.md).

``lab`` brings one test lab up for the whole session (LAB_NAME from LAB_TEST_NAME, default
``test``, so it never touches the demo) and takes it down at the end. Lab hosts boot when the
stack creates their instances, so every test lab comes with its CloudFormation stack, created
in the lab's AWS emulator by the real playbooks/provision.yml: ``ansible-playbook site.yml``
runs in ``lab.env`` exactly as it would against AWS.
Nothing is skipped: missing machine packages are installed by lab/host-deps.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

# The lab plumbing lives in support.lab; these names stay importable from conftest.
from support.lab import LabHost, LabSession, lab_command, start_lab

__all__ = ["LabHost", "LabSession", "lab_command", "start_lab"]

# Every test's time limit (pytest-timeout, which stops a hung test and names it), by suite,
# sized for a loaded 2-core machine. A test's own timeout mark wins; pytest.ini's 1200 s is the
# ceiling for anything else. A test pays for the fixtures it is the first to use: the lab
# suites' limits leave room for `lab/lab up` and, in deploy and hardening, a first deploy.
SUITE_TIMEOUTS = {
    "service": 300,  # a server on loopback, a few seconds of load at most
    "install": 600,  # fresh clones, a new venv and pip builds (isolated: grpcio-tools each time)
    "aws": 600,  # moto's server and up to five playbooks against it (~90 s on a quiet machine)
    "bench": 900,  # bench/run service for a round (its own limit is 600 s)
    # the session lab's `up` (3 hosts) and provision, and a few commands on the hosts; on a fresh
    # machine its first test also builds the image (cloud-init included: ~3 min quiet, 6-9 loaded)
    "lab": 900,
    "deploy": 900,  # lab up, provision, then a deploy of 3 hosts
    "hardening": 900,  # a one-host lab, its first deploy, and one fault with its rerun
    "ops": 1200,  # a two-host lab, the deploy workflow's command, its messages in the emulator
    "frontdoor": 1200,  # a lab of 3 hosts + the balancer, its first site.yml, a rolling upgrade
}


# The longest files first: make test's workers take files in collection order (Makefile:
# --no-loadscope-reorder), two each to start with, so no long lab file is left to start last and
# run alone. Seconds of each file in a fresh-clone run (7 Dec 2026, two workers); the 12-host
# file's beside the hardening file alone.
LONGEST_FIRST = (
    "hardening/test_lab_hardening.py",  # 940
    "deploy/test_deploy.py",  # 755
    "frontdoor/test_frontdoor_incidents.py",  # 743
    "deploy/test_rollout_fleet.py",  # 651
    "frontdoor/test_frontdoor.py",  # 603
    "deploy/test_rollout_release.py",  # 529
    "dayone/test_day_one.py",  # 454
    "deploy/test_releases.py",  # 413
    "frontdoor/test_fleet_of_12.py",  # 400
    "ops/test_notices.py",  # 270
    "deploy/test_first_boot.py",  # 155
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)

    def rank(item: pytest.Item) -> int:
        path = os.path.relpath(item.path, here)
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: file order within a rank, test order within a file
    for item in items:
        suite = item.path.parent.name
        if item.get_closest_marker("timeout") is None and suite in SUITE_TIMEOUTS:
            item.add_marker(pytest.mark.timeout(SUITE_TIMEOUTS[suite]))


@pytest.fixture(scope="session")
def lab() -> Iterator[LabSession]:
    """One lab for the whole test session: LAB_TEST_HOSTS hosts (default 3), provisioned.
    Nothing deploys on it right after its boot: a short busy first boot is enough."""
    name = os.environ.get("LAB_TEST_NAME", "test")
    session = start_lab(name, int(os.environ.get("LAB_TEST_HOSTS", "3")), busy_boot=5)
    try:
        yield session
    finally:
        down = lab_command(name, "down")
        assert down.returncode == 0, f"lab/lab down failed:\n{down.stdout}\n{down.stderr}"


@pytest.fixture(scope="session")
def lab_cli() -> Callable[..., subprocess.CompletedProcess]:
    """`lab_cli(name, *args)`: run lab/lab with LAB_NAME=name, capturing its output."""
    return lab_command


@pytest.fixture(scope="session")
def extra_lab() -> Iterator[Callable[..., LabSession]]:
    """`extra_lab(name, count, **settings)`: another lab beside the session's (provisioned; see
    start_lab), taken down at the end. Its hosts' busy first boot is 5 s unless `settings` say
    otherwise (busy_boot=None: the lab's default minute, which tests/deploy/test_first_boot.py
    proves the deploy waits out): a suite that deploys right away would sit out that minute."""
    started: list[str] = []

    def make(name: str, count: int, **settings: object) -> LabSession:
        started.append(name)
        settings.setdefault("busy_boot", 5)
        return start_lab(name, count, **settings)

    yield make
    for name in started:
        lab_command(name, "down")


@pytest.fixture(scope="session")
def lab_stack(lab: LabSession) -> LabSession:
    """The lab with its stack created in the emulator by the real playbooks/provision.yml (the
    session's lab has it from the start: its hosts boot with their instances)."""
    return lab
