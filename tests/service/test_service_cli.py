"""The ``greeter`` command: hello, probe and bench output and exit codes, live and dead."""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc
from greeter.server import SERVICE_NAME, Greeter, Health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.net import free_port
from support.server import CLIENT, clean_env, run_client

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RELEASE = f"{COMMIT}-5a1c0ffee123"  # <commit>-<config digest>: the conftest server's --release


def socket_owner(port: int) -> int | None:
    """The PID of the local process whose TCP socket has local port ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for process in Path("/proc").iterdir():
        if process.name.isdigit():
            with contextlib.suppress(OSError):
                for fd in (process / "fd").iterdir():
                    if os.readlink(fd) in inodes:
                        return int(process.name)
    return None


class CountingGreeter(Greeter):
    """The real servicer, counting the SayHello calls that reached it and the client processes
    (the owner of each peer's socket) that made them."""

    def __init__(self) -> None:
        super().__init__(256, pb.VersionInfo(version="test"))
        self.calls = 0
        self.peers: dict[str, int | None] = {}  # "ipv4:127.0.0.1:<port>" -> client PID
        self._lock = threading.Lock()

    def SayHello(self, request, context):
        peer = context.peer()
        with self._lock:
            self.calls += 1
            if peer not in self.peers:
                self.peers[peer] = socket_owner(int(peer.rsplit(":", 1)[1]))
        return super().SayHello(request, context)

    @property
    def client_pids(self) -> set[int | None]:
        return set(self.peers.values())


class InProcessServer:
    """A server in the test process, so the test can count what it really served."""

    def __init__(self) -> None:
        from concurrent import futures  # noqa: PLC0415

        self.greeter = CountingGreeter()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_GreeterServicer_to_server(self.greeter, self.server)
        health = Health()
        health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.server.start()


@pytest.fixture
def counting_servers() -> Iterator:
    started: list[InProcessServer] = []

    def start() -> InProcessServer:
        started.append(InProcessServer())
        return started[-1]

    yield start
    for server in started:
        server.server.stop(None)


def dead_target() -> str:
    return f"127.0.0.1:{free_port()}"


def bench_json(*args: str) -> tuple[int, dict]:
    result = run_client("bench", *args, "--json")
    assert result.returncode in (0, 4), result.stderr
    return result.returncode, json.loads(result.stdout)


# hello -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Teste", "Zé Ninguém", "世界"])
def test_hello_prints_the_greeting(server, name):
    result = run_client("hello", server.target, name)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"Olá, {name}!\n", "")


def test_hello_to_a_dead_target_exits_3(server):
    result = run_client("hello", dead_target(), "Teste", "--deadline", "3s")
    assert result.returncode == 3
    assert "UNAVAILABLE" in result.stderr


def test_hello_rpc_error_exits_4_with_code_and_details(server):
    result = run_client("hello", server.target, "   ")
    assert result.returncode == 4
    assert result.stderr == "greeter: INVALID_ARGUMENT: nome must not be empty\n"


@pytest.mark.parametrize(
    "args",
    [("hello", "127.0.0.1:99999", "x"), ("hello", "[::1", "x"), ("bench", "h", "-c", "0")],
)
def test_bad_usage_exits_2(args):
    assert run_client(*args).returncode == 2


# probe -----------------------------------------------------------------------------------


def test_probe_table_shows_a_live_and_a_dead_target_and_exits_4(server):
    dead = dead_target()
    result = run_client("probe", server.target, dead, "--deadline", "3")
    assert result.returncode == 4
    header, live, down = result.stdout.splitlines()
    assert header.split()[:8] == [
        "TARGET", "OK", "HEALTH", "LATENCY", "VERSION", "COMMIT", "CONFIG", "HOSTNAME"
    ]  # fmt: skip
    assert live.split()[:3] == [server.target, "yes", "SERVING"]
    # The release it runs: its commit and the digest of its configuration, side by side.
    assert live.split()[6:8] == [COMMIT[:12], "5a1c0ffee123"], live
    assert str(server.process.pid) in live
    assert down.split()[:3] == [dead, "NO", "-"]
    assert "UNAVAILABLE" in down


def test_probe_json_for_machines(server):
    result = run_client("probe", server.target, "--json", "--expect-commit", COMMIT[:7])
    assert result.returncode == 0, result.stdout
    (answer,) = json.loads(result.stdout)
    assert answer["ok"] is True
    assert answer["error"] == ""
    assert (answer["health"], answer["greeting"], answer["commit"], answer["release"]) == (
        "SERVING",
        "Olá, probe!",
        COMMIT,
        RELEASE,
    )
    assert answer["pid"] == server.process.pid
    assert answer["latency_ms"] > 0


def test_probe_fails_a_target_running_another_commit(server):
    result = run_client("probe", server.target, "--json", "--expect-commit", "deadbeef")
    assert result.returncode == 4
    (answer,) = json.loads(result.stdout)
    assert answer["ok"] is False
    assert "expected deadbeef" in answer["error"]


def test_probe_shows_the_front_door_first_and_each_backends_state_at_the_balancer(server):
    # The same server stands in for the balancer and for a backend: only the columns matter here.
    up = run_client(
        "probe", server.target, "--balancer", server.target,
        "--backend-state", f"{server.target}=UP",
    )  # fmt: skip
    assert up.returncode == 0, up.stdout
    header, front, backend = up.stdout.splitlines()
    assert header.split()[-2:] == ["BALANCER", "ERROR"]
    assert front.split()[:2] == [server.target, "yes"]
    assert front.split()[-1] == "front-door"
    assert backend.split()[-1] == "UP"

    drained = run_client(
        "probe", server.target, "--balancer", server.target, "--json",
        "--backend-state", f"{server.target}=drain",
    )  # fmt: skip
    assert drained.returncode == 4
    front, backend = json.loads(drained.stdout)
    assert (front["ok"], front["balancer"]) == (True, "front-door")
    assert (backend["ok"], backend["balancer"]) == (False, "DRAIN")
    assert backend["error"] == "DRAIN at the balancer"

    bad = run_client("probe", server.target, "--backend-state", f"{server.target}=SLEEPY")
    assert bad.returncode == 2
    assert "expected TARGET=UP|DOWN|DRAIN|MAINT" in bad.stderr


def test_probe_exits_3_when_no_target_is_reachable():
    result = run_client("probe", dead_target(), dead_target(), "--json", "--deadline", "3")
    assert result.returncode == 3
    answers = json.loads(result.stdout)
    assert [a["ok"] for a in answers] == [False, False]
    assert all("UNAVAILABLE" in a["error"] for a in answers)


def test_probe_reports_a_draining_server_as_not_serving(server_factory):
    draining = server_factory("--workers", "1", "--drain-delay", "10", "--grace", "1")
    draining.signal(signal.SIGTERM)
    draining.wait_event("draining")
    result = run_client("probe", draining.target, "--json")
    assert result.returncode == 4
    (answer,) = json.loads(result.stdout)
    assert (answer["ok"], answer["health"], answer["error"]) == (
        False,
        "NOT_SERVING",
        "health is NOT_SERVING",
    )
    draining.process.kill()  # no need to sit out the rest of the drain delay
    draining.process.wait()


# bench -----------------------------------------------------------------------------------


def test_bench_count_matches_the_calls_the_server_served(counting_servers):
    server = counting_servers()
    code, report = bench_json(
        server.target, "-n", "777", "-c", "13", "--connections", "3", "--warmup", "50"
    )
    assert code == 0
    assert report["count"] == 777
    assert report["status_codes"] == {"OK": 777}
    assert server.greeter.calls == 777 + 50  # the warm-up is made but not reported
    assert sum(bucket["count"] for bucket in report["histogram"]) == 777
    p = report["percentiles_ms"]
    assert report["fastest_ms"] <= p["p10"] <= p["p50"] <= p["p90"] <= p["p99"]
    assert p["p99"] <= report["slowest_ms"]
    assert report["rps"] == pytest.approx(777 / report["total_s"], rel=0.01)


def test_bench_for_a_duration_counts_every_call(counting_servers):
    server = counting_servers()
    code, report = bench_json(server.target, "-z", "1s", "-c", "8")
    assert code == 0
    assert report["count"] == server.greeter.calls > 0
    assert 1.0 <= report["total_s"] < 3


def test_bench_at_a_rate_makes_a_steady_load_over_processes_too(counting_servers):
    """--rate 100 for 2 s is about 200 calls however many slots and processes share it; flat
    out, the same run makes many more (a pacing that did nothing would pass neither way)."""
    server = counting_servers()
    for procs in ("1", "2"):
        before = server.greeter.calls
        code, report = bench_json(
            server.target, "-z", "2s", "-c", "8", "--procs", procs, "--rate", "100"
        )
        assert code == 0
        assert report["count"] == server.greeter.calls - before
        assert 120 <= report["count"] <= 215, (procs, report["count"])
    code, flat = bench_json(server.target, "-z", "2s", "-c", "8")
    assert code == 0 and flat["count"] > 600, flat["count"]
    refused = run_client("bench", server.target, "--rate", "0")
    assert refused.returncode == 2 and "calls per second above 0" in refused.stderr


def test_bench_over_several_processes_merges_their_counts(counting_servers):
    server = counting_servers()
    code, report = bench_json(server.target, "-n", "501", "-c", "10", "--procs", "2")
    assert code == 0
    assert report["count"] == server.greeter.calls == 501
    # The calls came from two client processes (not one process that was told "2").
    assert len(server.greeter.client_pids) == 2, server.greeter.peers
    assert None not in server.greeter.client_pids, server.greeter.peers


def test_bench_spreads_calls_round_robin_over_the_fleet(counting_servers):
    servers = [counting_servers() for _ in range(3)]
    code, report = bench_json(*(s.target for s in servers), "-n", "900", "-c", "9")
    assert code == 0
    assert report["count"] == sum(s.greeter.calls for s in servers) == 900
    for s in servers:
        assert s.greeter.calls > 150, [x.greeter.calls for x in servers]


def test_bench_text_report_has_every_section(counting_servers):
    server = counting_servers()
    result = run_client("bench", server.target, "-n", "200", "-c", "5")
    assert result.returncode == 0
    for heading in (
        "Summary:",
        "Count:        200",
        "Total:",
        "Slowest:",
        "Fastest:",
        "Average:",
        "Requests/sec:",
        "Response time histogram:",
        "Latency distribution:",
        "99 % in",
        "Status code distribution:",
        "[OK]\t200 responses",
    ):
        assert heading in result.stdout


def test_bench_counts_failed_calls_by_status_and_exits_4(counting_servers):
    server = counting_servers()
    code, report = bench_json(server.target, "-n", "100", "-c", "4", "--name", " ")
    assert code == 4
    assert report["count"] == 100
    assert report["status_codes"] == {"INVALID_ARGUMENT": 100}
    assert report["errors"] == {"INVALID_ARGUMENT: nome must not be empty": 100}


def test_bench_against_a_dead_target_exits_3():
    result = run_client("bench", dead_target(), "-n", "10")
    assert result.returncode == 3
    assert "cannot connect" in result.stderr


def test_bench_fails_no_call_while_a_fleet_server_drains(server_factory):
    fleet = [server_factory("--workers", "1", "--drain-delay", "1") for _ in range(2)]
    bench = subprocess.Popen(
        [CLIENT, "bench", *(s.target for s in fleet), "-z", "4s", "-c", "20", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    time.sleep(1.5)
    fleet[0].signal(signal.SIGTERM)  # a rolling restart takes this host out under load
    assert fleet[0].process.wait(20) == 0
    # The bench's health Watch streams were ended at stop: no waiting out the 10 s grace.
    assert fleet[0].wait_event("stopped")["seconds"] < 5
    out, err = bench.communicate(timeout=60)
    report = json.loads(out)
    assert bench.returncode == 0, report["errors"]
    assert report["status_codes"] == {"OK": report["count"]}
    assert report["count"] > 500
    assert "calls/s" in err  # progress is shown on runs longer than 3 s
    with grpc.insecure_channel(fleet[1].target) as channel:
        reply = pb_grpc.GreeterStub(channel).SayHello(pb.Mensagem(nome="x"), timeout=5)
    assert reply.texto == "Olá, x!"
