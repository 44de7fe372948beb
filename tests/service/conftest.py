"""Real ``greeter-server`` processes on free loopback ports, for the service tests.

Servers run as subprocesses of the installed console script (what systemd runs), are
considered up when they log the ``serving`` event, and are stopped by their PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER = str(BIN / "greeter-server")
CLIENT = str(BIN / "greeter")

try:
    from greeter import hello_pb2  # noqa: F401 -- generated, not committed
except ImportError:  # a fresh clone: run the project's one proto command
    subprocess.run([sys.executable, str(REPO / "protos" / "compile.py")], check=True)


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any GREETER_* settings of the caller, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GREETER_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class Server:
    """A running ``greeter-server`` subprocess and the JSON lines it logged."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, wait: bool = True) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [SERVER, "--bind", "127.0.0.1", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or clean_env(),
        )
        self.events: list[dict] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_event("serving")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)  # every stdout line must be one JSON object
            self.events.append(event)
            self._lines.put(event)
        self._lines.put(None)

    def wait_event(self, name: str, timeout: float = 15) -> dict:
        """Block until the server logs event ``name``; fail if it exits first."""
        for event in self.events:
            if event["event"] == name:
                return event
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {name!r} event within {timeout} s: {self.events}")
            if event is None:
                stderr = self.process.stderr.read() if self.process.stderr else ""
                pytest.fail(f"server exited before {name!r}: {self.events} {stderr}")
            if event["event"] == name:
                return event

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def channel(self, **options: object) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=list(options.items()))


@pytest.fixture
def server_factory() -> Iterator:
    """Start servers with given flags; every one is stopped (by PID) at the end of the test."""
    started: list[Server] = []

    def start(*args: str, **kwargs: object) -> Server:
        server = Server(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One plain single-process server shared by a module's read-only tests."""
    server = Server("--workers", "1", "--revision", "0123456789abcdef0123456789abcdef01234567")
    yield server
    server.stop()


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
