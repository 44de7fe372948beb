"""Session fixtures for tests that run on lab hosts (see lab/README.md).

``lab`` brings one test lab up for the whole session (LAB_NAME from LAB_TEST_NAME, default
``test``, so it never touches the demo) and takes it down at the end; ``lab_stack`` adds the
CloudFormation stack in the lab's AWS emulator through the real playbooks/provision.yml, so
``ansible-playbook site.yml`` runs in ``lab.env`` exactly as it would against AWS.
Nothing is skipped: missing machine packages are installed by lab/host-deps.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.lab import prefixed

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / "lab" / "lab"


@dataclass(frozen=True)
class LabHost:
    name: str  # inventory name, Name tag and hostname, e.g. greeter-1
    address: str


@dataclass
class LabSession:
    """A running lab: its environment, its hosts and small helpers to drive them."""

    name: str
    state: Path
    env: dict[str, str]  # os.environ plus `lab/lab env`: use it for every ansible/aws command
    hosts: list[LabHost]
    subnet: str
    bridge: str
    bridge_address: str

    @property
    def git_mirror(self) -> Path:
        """The bare repository served as git://<bridge>/greeter.git: push test commits here."""
        return Path(self.env["LAB_GIT_MIRROR"])

    def run(
        self, *args: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        """Run a command from the repository root in the lab environment, capturing its output."""
        result = subprocess.run(
            list(args),
            check=False,
            cwd=REPO,
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"{shlex.join(args)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
            )
        return result

    def ssh(
        self, host: LabHost | str, command: str, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a shell command on a lab host as `ubuntu` (through lab/lab ssh: route-checked)."""
        name = host.name if isinstance(host, LabHost) else host
        return self.run(str(LAB), "ssh", name, command, check=check, timeout=300)

    def playbook(
        self, playbook: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess:
        return self.run("ansible-playbook", playbook, *args, check=check)


def lab_command(name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAB_NAME=prefixed(name))
    return subprocess.run(
        [str(LAB), *args],
        check=False,
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def start_lab(name: str, count: int) -> LabSession:
    """Bring a lab up from scratch (a leftover lab of that name is taken down first)."""
    subprocess.run([str(REPO / "lab" / "host-deps")], check=True, timeout=900)
    lab_command(name, "down")
    up = lab_command(name, "up", str(count))
    if up.returncode != 0:
        lab_command(name, "down")
        pytest.fail(f"lab/lab up {count} failed:\n{up.stdout}\n{up.stderr}")
    exports = lab_command(name, "env").stdout
    env = dict(os.environ)
    for line in exports.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    state = REPO / ".lab" / prefixed(name)
    saved = json.loads((state / "lab.json").read_text())
    return LabSession(
        name=prefixed(name),
        state=state,
        env=env,
        hosts=[LabHost(h["name"], h["address"]) for h in saved["hosts"]],
        subnet=saved["subnet"],
        bridge=saved["bridge"],
        bridge_address=saved["bridge_address"],
    )


@pytest.fixture(scope="session")
def lab() -> Iterator[LabSession]:
    """One lab for the whole test session: LAB_TEST_HOSTS hosts (default 3)."""
    name = os.environ.get("LAB_TEST_NAME", "test")
    session = start_lab(name, int(os.environ.get("LAB_TEST_HOSTS", "3")))
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
def extra_lab() -> Iterator[Callable[[str, int], LabSession]]:
    """`extra_lab(name, count)`: another lab beside the session's, taken down at the end."""
    started: list[str] = []

    def make(name: str, count: int) -> LabSession:
        started.append(name)
        return start_lab(name, count)

    yield make
    for name in started:
        lab_command(name, "down")


@pytest.fixture(scope="session")
def lab_stack(lab: LabSession) -> LabSession:
    """The lab with its stack created in the emulator by the real playbooks/provision.yml."""
    lab.playbook("playbooks/provision.yml")
    return lab
