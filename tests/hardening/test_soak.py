"""The short soak: lab/soak against a local greeter-server, 1000 calls in flight.

The long version (60 s and more, against a lab host over SSH) is the documented command
`lab/soak`; this one runs the same script for a warm-up round of 8 s and steady rounds of
40k calls, so `make test` proves that the server keeps every one of 1000 concurrent calls and
that its memory levels off: a steady round leaves no more than a few bytes per call behind.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from collections.abc import Iterator

import pytest
from support.net import free_port
from support.server import Server

REPO = pathlib.Path(__file__).resolve().parents[2]
SOAK = REPO / "lab" / "soak"
IN_FLIGHT = 1000
# The steady round is a number of calls, not a time, so the leak bound below means the same on
# a busy machine: 40k calls take ~10 s on a quiet 2-core machine.
STEADY_CALLS = 40_000
# Memory a steady server may still gain per call in a round of the same load after the warm-up,
# measured idle after each round (after the load, so the calls in flight do not count). Measured
# here: 20-63 bytes per call over 43k-52k calls on a quiet machine (allocator noise, +1 to +3 MiB a
# round), but once 324 while lab tests ran beside it (the allocator took a new arena's worth). A
# leak grows by the same amount every round; noise does not: so the server passes when one of two
# steady rounds keeps less than the bound. Measured with a leak put into the server: 600 bytes a
# call fails every time (5 of 5 runs, 540-1060 bytes a round); 300 bytes a call, near the bound,
# fails only about 6 runs in 10 (257-510 bytes a round).
LEAK_BYTES_PER_CALL = 256
STEADY_ROUNDS = 2


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server("--workers", "2", "--grace", "2")
    yield running
    assert running.stop() == 0, running.output()


def soak(server: Server, *length: str) -> dict:
    result = subprocess.run(
        [str(SOAK), server.target, "--pid", str(server.process.pid), "-c", str(IN_FLIGHT),
         *length, "--interval", "1", "--warmup", "3", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"soak exited {result.returncode}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


@pytest.mark.timeout(900)
def test_short_soak_fails_no_call_and_memory_levels_off(server: Server) -> None:
    warm = soak(server, "-z", "8s")
    assert warm["failed"] == 0
    idle_before = warm["rss_kib"]["end"]
    kept = []  # bytes per call each steady round kept, idle after it against idle before it
    for _ in range(STEADY_ROUNDS):
        steady = soak(server, "-n", str(STEADY_CALLS))
        assert steady["failed"] == 0, steady["errors"]
        assert steady["calls"] == STEADY_CALLS
        # What the client really kept in flight (Little's law: rate x mean latency), not what
        # it was asked for: a bench that ran fewer calls at once would not reach this.
        assert steady["in_flight"] >= 0.9 * IN_FLIGHT, steady
        assert steady["sampling_errors"] == []
        kept.append((steady["rss_kib"]["end"] - idle_before) * 1024 / steady["calls"])
        idle_before = steady["rss_kib"]["end"]
        if kept[-1] < LEAK_BYTES_PER_CALL:
            break  # levelled off
    assert kept[-1] < LEAK_BYTES_PER_CALL, (kept, warm["rss_kib"], steady["rss_kib"])
    assert server.alive()


def test_soak_exits_non_zero_when_calls_fail() -> None:
    """No server on the port: every call fails, and the soak says so by its status."""
    port = free_port()
    result = subprocess.run(
        [str(SOAK), f"127.0.0.1:{port}", "--pid", "1", "-c", "10", "-z", "2s", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 3, result  # 3: cannot connect (greeter bench's contract)
