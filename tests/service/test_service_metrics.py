"""``--metrics-port``: Prometheus numbers of real calls, one scrape for every worker process."""

import os
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from greeter import __version__
from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc
from greeter.metrics import FLUSH_SECONDS
from prometheus_client.parser import text_string_to_metric_families
from support.net import free_port
from support.server import Server, clean_env
from test_service_config import assert_refused, run_server

REVISION = "0123456789abcdef0123456789abcdef01234567"
SAY_HELLO = {"grpc_type": "unary", "grpc_service": "hello.Greeter", "grpc_method": "SayHello"}
GET_VERSION = {**SAY_HELLO, "grpc_method": "GetVersion"}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def settled_scrape(port: int, done: "callable", timeout: float = 20) -> dict:
    """The first scrape for which ``done(samples)`` holds, once a later flush has not changed it.

    Each worker moves its counts into the scraped files every FLUSH_SECONDS, so a scrape right
    after the calls may be a flush behind; the numbers must then reach the expected values and
    stay there (a count that overshoots never equals them)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if done(samples):
            time.sleep(3 * FLUSH_SECONDS)
            again = scrape(port)
            assert again == samples, "the numbers moved after they were complete"
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"the scrape never showed the expected numbers: {samples}")
        time.sleep(0.1)


def calls(server: Server, ok: int, invalid: int, connections: int) -> set[int]:
    """``ok`` good and ``invalid`` empty-name SayHello calls and one GetVersion per connection,
    spread over ``connections`` separate TCP connections; returns the pids that answered."""
    pids = set()
    for index in range(connections):
        # A local subchannel pool: each channel opens its own connection (SO_REUSEPORT spreads
        # connections, not calls, over the workers).
        with server.channel(**{"grpc.use_local_subchannel_pool": 1}) as channel:
            stub = pb_grpc.GreeterStub(channel)
            pids.add(stub.GetVersion(pb.VersionRequest(), timeout=10).pid)
            for _ in range(index, ok, connections):
                assert stub.SayHello(pb.Mensagem(nome="metrics"), timeout=10).texto
            for _ in range(index, invalid, connections):
                with pytest.raises(grpc.RpcError) as failed:
                    stub.SayHello(pb.Mensagem(nome=""), timeout=10)
                assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return pids


@pytest.mark.parametrize("workers", [1, 2])
def test_one_scrape_shows_exactly_the_calls_made(server_factory, workers):
    port = free_port()
    server = server_factory(
        "--workers", str(workers), "--metrics-port", str(port), "--revision", REVISION
    )
    assert server.wait_event("serving")["metrics_port"] == port
    ok, invalid, connections = 23, 7, 12
    pids = calls(server, ok, invalid, connections)
    assert len(pids) == workers  # every worker served some of the calls

    def handled(samples: dict) -> float:
        return sum(v for (name, _), v in samples.items() if name == "grpc_server_handled_total")

    samples = settled_scrape(port, lambda s: handled(s) == ok + invalid + connections)
    handled_series = {
        labels: v for (name, labels), v in samples.items() if name == "grpc_server_handled_total"
    }
    assert handled_series == {
        frozenset({**SAY_HELLO, "grpc_code": "OK"}.items()): ok,
        frozenset({**SAY_HELLO, "grpc_code": "INVALID_ARGUMENT"}.items()): invalid,
        frozenset({**GET_VERSION, "grpc_code": "OK"}.items()): connections,
    }
    assert value(samples, "grpc_server_started_total", **SAY_HELLO) == ok + invalid
    assert value(samples, "grpc_server_started_total", **GET_VERSION) == connections
    # The histogram counted every call once, each in some bucket.
    assert value(samples, "grpc_server_handling_seconds_count", **SAY_HELLO) == ok + invalid
    assert value(samples, "grpc_server_handling_seconds_bucket", **SAY_HELLO, le="+Inf") == (
        ok + invalid
    )
    assert 0 < value(samples, "grpc_server_handling_seconds_sum", **SAY_HELLO) < 10 * (ok + invalid)
    assert value(samples, "grpc_server_calls_in_flight", **SAY_HELLO) == 0
    assert value(samples, "greeter_build_info", version=__version__, commit=REVISION) == 1
    assert server.stop() == 0


def test_calls_waiting_for_their_request_are_in_flight(server_factory):
    port = free_port()
    server = server_factory("--workers", "1", "--metrics-port", str(port))
    release = threading.Event()

    def request_later():
        release.wait()
        yield pb.Mensagem(nome="late")

    with server.channel() as channel:
        # Headers now, the request message only on release: the call has arrived, not ended.
        say_hello = channel.stream_unary(
            "/hello.Greeter/SayHello",
            request_serializer=pb.Mensagem.SerializeToString,
            response_deserializer=pb.Resposta.FromString,
        )
        waiting = [say_hello.future(request_later(), timeout=30) for _ in range(3)]
        settled_scrape(port, lambda s: value(s, "grpc_server_calls_in_flight", **SAY_HELLO) == 3)
        release.set()
        assert [call.result().texto for call in waiting] == ["Olá, late!"] * 3
    samples = settled_scrape(
        port, lambda s: value(s, "grpc_server_calls_in_flight", **SAY_HELLO) == 0
    )
    assert value(samples, "grpc_server_handling_seconds_count", **SAY_HELLO) == 3


def test_requests_grpc_rejects_before_a_handler_are_started_not_handled(server_factory):
    port = free_port()
    server = server_factory(
        "--workers", "1", "--max-message-bytes", "1024", "--metrics-port", str(port)
    )
    with server.channel() as channel:
        stub = pb_grpc.GreeterStub(channel)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as failed:
                stub.SayHello(pb.Mensagem(nome="x" * 4096), timeout=10)
            assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.SayHello(pb.Mensagem(nome="fits"), timeout=10).texto == "Olá, fits!"
    samples = settled_scrape(
        port, lambda s: value(s, "grpc_server_started_total", **SAY_HELLO) == 3
    )
    assert value(samples, "grpc_server_handled_total", **SAY_HELLO, grpc_code="OK") == 1
    assert value(samples, "grpc_server_calls_in_flight", **SAY_HELLO) == 0


def listening_ports(pids: set[int]) -> set[int]:
    """TCP ports these processes listen on (their sockets matched in /proc/net/tcp*)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("workers", ["1", "2"])
def test_off_by_default_only_the_grpc_port_listens(server_factory, workers):
    server = server_factory("--workers", workers)
    assert server.wait_event("serving")["metrics_port"] == 0
    pids = server.pids()
    assert len(pids) == int(workers) + (workers != "1")
    assert listening_ports(pids) == {server.port}


def test_on_by_environment_and_the_directory_is_removed_at_exit(server_factory, tmp_path):
    port = free_port()
    env = clean_env(
        GREETER_METRICS_PORT=str(port), GREETER_WORKERS="2", RUNTIME_DIRECTORY=str(tmp_path)
    )
    server = server_factory(env=env)
    (directory,) = tmp_path.iterdir()  # the server's own, fresh directory
    assert scrape(port)  # answers while serving
    assert server.stop() == 0
    assert not directory.exists()


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (("--metrics-port", "http"), {}, ("--metrics-port", "'http'")),
        (("--metrics-port", "70000"), {}, ("--metrics-port", "0-65535")),
        ((), {"GREETER_METRICS_PORT": "-1"}, ("GREETER_METRICS_PORT", "0-65535")),
        (("--port", "50123", "--metrics-port", "50123"), {}, ("--metrics-port", "differ")),
    ],
)
def test_bad_metrics_port_exits_2_with_one_line(args, env, words):
    result = run_server(*args, **env)
    assert_refused(result.returncode, result.stdout, result.stderr, 2, *words)


def test_taken_metrics_port_exits_1_before_serving():
    import socket  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_server(
            "--bind", "127.0.0.1", "--port", str(free_port()), "--metrics-port", port
        )
    assert_refused(result.returncode, result.stdout, result.stderr, 1, "127.0.0.1:" + port)
