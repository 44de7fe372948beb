"""Real ``greeter-server`` processes on free loopback ports, for the service tests.

``Server``, ``free_port``, ``clean_env`` and ``run_client`` come from the shared support library
(tests/support); they stay importable from here (``from conftest import ...``).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest
from support.net import free_port
from support.server import CLIENT, SERVER, Server, clean_env, run_client

__all__ = ["CLIENT", "SERVER", "Server", "clean_env", "free_port", "run_client"]


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
    commit = "0123456789abcdef0123456789abcdef01234567"
    server = Server("--workers", "1", "--revision", commit, "--release", f"{commit}-5a1c0ffee123")
    yield server
    server.stop()
