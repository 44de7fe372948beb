"""What a lab is made of (its record in ``.lab/<name>/lab.json``) and the processes it started."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import DEFAULT_DISTRO, LAB_ROOT, REGION, STACK, STOP_TIMEOUT, lab_name


@dataclass
class Host:
    """One lab host: a container booted in its own network namespace."""

    index: int
    name: str  # the instance's Name tag, also its hostname and inventory name
    address: str
    netns: str
    veth: str
    machine: str


@dataclass
class Lab:
    """Everything `up` made, saved in the state folder so that `down` can undo exactly that."""

    name: str
    subnet: str
    bridge: str
    bridge_address: str
    image: str = ""
    commit: str = ""
    stack: str = STACK  # GREETER_STACK_NAME at `up`: the stack the lab's hosts stand in for
    distro: str = DEFAULT_DISTRO  # LAB_DISTRO at `up`: the Debian release the hosts run
    busy_boot: float = 0.0  # LAB_BUSY_BOOT at `up`: seconds dpkg is locked after a first boot
    region: str = REGION  # LAB_REGION at `up`: the launcher's and `lab env`'s AWS region
    hosts: list[Host] = field(default_factory=list)  # the backends, <stack>-1 .. <stack>-N
    balancer: Host | None = None  # the stack's balancer instance <stack>-lb (`up --balancer`)
    processes: dict[str, list[int]] = field(default_factory=dict)  # role -> [pid, start time]
    emulator_port: int = 0  # the loopback port the emulator bound (0 until it answers)

    @property
    def machines(self) -> list[Host]:
        """Every host the lab runs: the backends, then the balancer."""
        return [*self.hosts, *([self.balancer] if self.balancer else [])]

    @property
    def state(self) -> Path:
        return LAB_ROOT / self.name

    def save(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.state / "lab.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(self.state / "lab.json")

    @classmethod
    def load(cls, name: str) -> Lab | None:
        path = LAB_ROOT / name / "lab.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["hosts"] = [Host(**h) for h in data["hosts"]]
        data["balancer"] = Host(**data["balancer"]) if data.get("balancer") else None
        return cls(**data)


def start_time(pid: int) -> int | None:
    """The process start time from /proc: a PID plus this identifies one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(record: list[int] | None) -> bool:
    return bool(record) and start_time(record[0]) == record[1]


def spawn(lab: Lab, role: str, args: list[str], logfile: Path, **kwargs) -> None:
    """Start a long-running lab process detached from this command, remembered by PID."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    lab.processes[role] = [proc.pid, start_time(proc.pid) or 0]
    lab.save()


def terminate(records: list[list[int]]) -> None:
    """SIGTERM the lab's own processes, only if PID and start time still match."""
    for record in records:
        if alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record[0], signal.SIGTERM)


def stop(records: list[list[int]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the lab's own processes, give them `timeout` seconds, then SIGKILL."""
    live = [r for r in records if alive(r)]
    terminate(live)
    deadline = time.monotonic() + timeout
    while any(alive(r) for r in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, started in live:
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    """One `up` or `down` at a time per lab name."""
    LAB_ROOT.mkdir(exist_ok=True)
    with (LAB_ROOT / f"{lab_name()}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
