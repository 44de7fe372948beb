"""Test labs (lab/lab): their names, and a running lab's environment, hosts and helpers."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import watchdog

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab" / "lab"


def prefixed(name: str) -> str:
    """A test lab's LAB_NAME: LAB_TEST_PREFIX + name, so two checkouts can run the lab suites at
    once without sharing a bridge or a network namespace name. Under pytest-xdist each worker
    adds its id (gw0-, gw1-, ...): every worker brings up labs of its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return os.environ.get("LAB_TEST_PREFIX", "") + (f"{worker}-" if worker else "") + name


def output(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a finished command, together."""
    return (result.stdout or "") + (result.stderr or "")


@dataclass(frozen=True)
class LabHost:
    name: str  # inventory name, Name tag and hostname, e.g. greeter-1
    address: str
    veth: str = ""  # its veth end on the machine (on the lab bridge): `ip link set <veth> down`


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
    commit: str = ""  # the commit `lab/lab up` put on the mirror's main and in the inventory
    balancer: LabHost | None = None  # the host standing in for the stack's balancer, greeter-lb

    @property
    def git_mirror(self) -> Path:
        """The bare repository served as git://<bridge>/greeter.git: push test commits here."""
        return Path(self.env["LAB_GIT_MIRROR"])

    def push_commit(
        self, scratch: Path, message: str, edit: Callable[[Path], None] | None = None
    ) -> str:
        """A new commit on top of the mirror's main, made in a clone under `scratch` by `edit`
        (by default a marker file, UPGRADE, holding the message) and pushed to the mirror as
        branch test/<its first 12 hex digits>. Returns its sha."""
        clone = scratch / f"clone-{time.monotonic_ns()}"
        git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
        subprocess.run([*git, "clone", "--quiet", str(self.git_mirror), str(clone)], check=True)
        if edit is None:
            (clone / "UPGRADE").write_text(f"{message}\n")
        else:
            edit(clone)
        subprocess.run([*git, "-C", str(clone), "add", "-A"], check=True)
        subprocess.run([*git, "-C", str(clone), "commit", "--quiet", "-m", message], check=True)
        sha = subprocess.run(
            [*git, "-C", str(clone), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        branch = f"HEAD:refs/heads/test/{sha[:12]}"
        subprocess.run([*git, "-C", str(clone), "push", "--quiet", "origin", branch], check=True)
        return sha

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 900,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command from the repository root in the lab environment, capturing its output.

        Under the watchdog: past `timeout` seconds the command and all it started are stopped
        and Stuck says where it was stuck."""
        result = watchdog.run(list(args), timeout, cwd=REPO, env=env or self.env)
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
        self, playbook: str, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        return self.run("ansible-playbook", playbook, *args, check=check, env=env)


def lab_command(
    name: str, *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """lab/lab with LAB_NAME=prefixed(name) (and `env` added), capturing its output."""
    env = {**os.environ, **(env or {}), "LAB_NAME": prefixed(name)}
    return watchdog.run([LAB, *args], timeout, cwd=REPO, env=env)


def attach_lab(name: str) -> LabSession:
    """The LabSession of lab `name` (prefixed), which is up already."""
    exports = lab_command(name, "env")
    if exports.returncode != 0:
        pytest.fail(f"lab/lab env of {prefixed(name)} failed:\n{output(exports)}")
    env = dict(os.environ)
    for line in exports.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    state = REPO / ".lab" / prefixed(name)
    saved = json.loads((state / "lab.json").read_text())
    return LabSession(
        name=prefixed(name),
        state=state,
        env=env,
        hosts=[LabHost(h["name"], h["address"], h.get("veth", "")) for h in saved["hosts"]],
        subnet=saved["subnet"],
        bridge=saved["bridge"],
        bridge_address=saved["bridge_address"],
        commit=saved.get("commit", ""),
        balancer=LabHost(b["name"], b["address"], b.get("veth", ""))
        if (b := saved.get("balancer"))
        else None,
    )


def start_lab(
    name: str,
    count: int,
    *,
    balancer: bool = False,
    busy_boot: float | None = None,
    distro: str | None = None,
    region: str | None = None,
    provision: bool = True,
) -> LabSession:
    """Bring a lab up from scratch (a leftover lab of that name is taken down first).

    Its hosts boot when the stack creates their instances, so by default the lab's stack is
    provisioned (playbooks/provision.yml, which waits for SSH) before the lab is handed over.
    `balancer`: the lab also runs a host for the stack's balancer instance (<stack>-lb); without
    it the lab's stack has none (greeter_stack_balancer: false), which spares every suite that
    does not test the front door a host's boot time and memory. `busy_boot`: LAB_BUSY_BOOT, the
    seconds dpkg stays locked after a host's first boot (the lab's default, about a minute, when
    None). `distro`: LAB_DISTRO (bookworm when None). `region`: LAB_REGION, the AWS region the
    lab's hosts stand in for (the lab's default when None)."""
    subprocess.run([str(REPO / "lab" / "host-deps")], check=True, timeout=900)
    lab_command(name, "down")
    settings = {}
    if busy_boot is not None:
        settings["LAB_BUSY_BOOT"] = f"{busy_boot:g}"
    if distro is not None:
        settings["LAB_DISTRO"] = distro
    if region is not None:
        settings["LAB_REGION"] = region
    up = lab_command(name, "up", str(count), *(["--balancer"] if balancer else []), env=settings)
    if up.returncode != 0:
        lab_command(name, "down")
        pytest.fail(f"lab/lab up {count} failed:\n{up.stdout}\n{up.stderr}")
    session = attach_lab(name)
    if provision:
        session.playbook("playbooks/provision.yml")
    return session
