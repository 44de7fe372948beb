"""A real ``greeter-server`` on a free loopback port, and the ``greeter`` client command.

Servers run as subprocesses of the installed console script (what systemd runs), count as up
when they log the ``serving`` event (logged right after READY=1, once every worker serves), and
are stopped by their PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest

from support.net import free_port

BIN = Path(sys.executable).parent
SERVER = str(BIN / "greeter-server")
CLIENT = str(BIN / "greeter")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any GREETER_* settings of the caller, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GREETER_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class Server:
    """A running ``greeter-server`` subprocess and the JSON lines it logged.

    ``Server("--workers", "2")`` starts it and waits for ``serving``; ``wait=False`` returns at
    once (``wait_event`` later); ``executable`` runs another install's ``greeter-server``. Every
    stdout line must be one JSON object.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        port: int | None = None,
        executable: str = SERVER,
    ) -> None:
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.args = list(args)
        # stderr goes to a file: a pipe nobody reads would block a chatty server.
        self._stderr = tempfile.TemporaryFile(mode="w+", prefix="greeter-server-")  # noqa: SIM115 -- lives as long as the server
        self.process = subprocess.Popen(
            [executable, "--bind", "127.0.0.1", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env or clean_env(),
            start_new_session=True,  # its own process group: pids() finds the workers
        )
        self.events: list[dict] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_event("serving")

    @property
    def proc(self) -> subprocess.Popen:
        """The old hardening_support name of ``process``."""
        return self.process

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)  # every stdout line must be one JSON object
            self.events.append(event)
            self._lines.put(event)
        self._lines.put(None)

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        """Block until the server logs event ``name``; fail if it exits first."""
        for event in self.events:
            if event["event"] == name:
                return event
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {name!r} event within {timeout} s: {self.output()}")
            if event is None:
                self.process.wait(10)
                pytest.fail(f"server exited before {name!r}: {self.output()}")
            if event["event"] == name:
                return event

    def output(self) -> str:
        """What the server logged so far: its JSON events, then its stderr."""
        self._stderr.seek(0)
        return "\n".join(json.dumps(e, ensure_ascii=False) for e in self.events) + (
            "\n" + self._stderr.read()
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> set[int]:
        """The server process and its workers (its process group)."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    if os.getpgid(int(entry.name)) == self.process.pid:
                        found.add(int(entry.name))
        return found

    def rss_kib(self) -> int:
        """Resident memory of the server and its workers, in KiB."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (as systemd stops it), then the exit status; SIGKILL the group only if it
        hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout)

    def channel(self, **options: object) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=list(options.items()))


def run_client(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the ``greeter`` console script and capture its output."""
    return subprocess.run(
        [CLIENT, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )
