"""Start-up, readiness, drain on SIGTERM, worker processes and their supervision."""

import os
import queue
import signal
import socket
import time
import uuid
from datetime import datetime

import grpc
import pytest
from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.server import clean_env

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def fresh_stub(target: str) -> tuple[grpc.Channel, pb_grpc.GreeterStub]:
    """A stub on its own TCP connection (no subchannel shared with other channels)."""
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, pb_grpc.GreeterStub(channel)


def test_lifecycle_is_logged_as_json_lines(server_factory):
    server = server_factory("--workers", "1", "--revision", "feedbeef")
    assert server.stop() == 0
    events = [event["event"] for event in server.events]
    assert events == ["starting", "serving", "draining", "stopped"]
    for event in server.events:
        assert {"ts", "level", "event", "pid"} <= event.keys()
        assert event["pid"] == server.process.pid
        datetime.fromisoformat(event["ts"])
    serving = server.events[1]
    assert serving["address"] == server.target
    assert (serving["workers"], serving["tls"], serving["commit"]) == (1, False, "feedbeef")


def test_sigterm_lets_an_open_call_finish_refuses_new_ones_and_exits_0(server_factory):
    server = server_factory("--workers", "1", "--grace", "30")
    requests: queue.Queue = queue.Queue()
    list_services = reflection_pb2.ServerReflectionRequest(list_services="")
    with server.channel() as channel:
        # A reflection stream is a real call that stays open as long as the client wants.
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(requests.get, None), timeout=60
        )
        requests.put(list_services)
        assert next(stream).list_services_response.service
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        server.wait_event("draining")
        time.sleep(0.5)  # well into the grace period
        # The open call is still served ...
        requests.put(list_services)
        assert next(stream).list_services_response.service
        # ... while new calls are refused.
        late_channel, late = fresh_stub(server.target)
        with late_channel, pytest.raises(grpc.RpcError) as refused:
            late.SayHello(pb.Mensagem(nome="late"), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.process.poll() is None
        requests.put(None)  # the client ends its call: nothing is in flight any more
        assert list(stream) == []
        assert server.process.wait(20) == 0
    assert time.monotonic() - signalled < 15  # stopped when the call ended, not at grace end


def test_sigterm_during_a_burst_with_drain_delay_fails_no_call(server_factory):
    # Calls still queued inside gRPC's transport when the server stops are CANCELLED by gRPC
    # itself; the drain delay is what lets that queue empty first (see service/README.md). A
    # balancer keeps sending until it sees NOT_SERVING, so calls sent during the delay count too.
    server = server_factory("--workers", "1", "--threads", "4", "--drain-delay", "5")
    channel, stub = fresh_stub(server.target)
    finished_at: dict[int, float] = {}

    def send(index: int) -> grpc.Future:
        call = stub.SayHello.future(pb.Mensagem(nome=f"n{index}"), timeout=30)
        call.add_done_callback(lambda _, i=index: finished_at.setdefault(i, time.time()))
        return call

    with channel:
        calls = [send(index) for index in range(1500)]
        server.signal(signal.SIGTERM)
        draining = server.wait_event("draining")
        calls += [send(index) for index in range(1500, 1700)]  # sent while it drains
        answers = [call.result().texto for call in calls]  # raises if any call failed
        assert answers == [f"Olá, n{i}!" for i in range(1700)]
        assert server.process.wait(30) == 0
    drain_started = datetime.fromisoformat(draining["ts"]).timestamp()
    # The burst really was still being answered after the server began to drain.
    assert sum(at > drain_started for at in finished_at.values()) > 50


def test_drain_delay_reports_not_serving_while_still_answering(server_factory):
    server = server_factory("--workers", "1", "--drain-delay", "2", "--grace", "5")
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        server.wait_event("draining")
        for service in ("", "hello.Greeter"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == NOT_SERVING
        reply = pb_grpc.GreeterStub(channel).SayHello(pb.Mensagem(nome="still"), timeout=5)
        assert reply.texto == "Olá, still!"
    assert server.process.wait(20) == 0
    assert time.monotonic() - signalled >= 2


def notify_socket(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(20)
    return sock


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sd_notify_ready_once_serving_and_stopping_on_sigterm(server_factory, workers):
    name = f"greeter-test-{uuid.uuid4().hex}"
    with notify_socket(name) as sock:
        server = server_factory(
            "--workers", workers, env=clean_env(NOTIFY_SOCKET="@" + name), wait=False
        )
        assert sock.recv(256) == b"READY=1"
        # READY=1 means every worker serves: a call right now must succeed.
        channel, stub = fresh_stub(server.target)
        with channel:
            assert stub.SayHello(pb.Mensagem(nome="ready"), timeout=5).texto == "Olá, ready!"
        server.signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
    assert server.process.wait(20) == 0


def test_workers_share_the_port_and_answer_from_several_pids(server_factory):
    server = server_factory("--workers", "2")
    worker_pids = set(server.wait_event("serving")["worker_pids"])
    assert len(worker_pids) == 2
    assert server.process.pid not in worker_pids
    answered = set()
    for _ in range(40):
        channel, stub = fresh_stub(server.target)
        with channel:
            answered.add(stub.GetVersion(pb.VersionRequest(), timeout=5).pid)
    assert answered == worker_pids
    assert server.stop() == 0
    assert [e["event"] for e in server.events].count("worker_stopped") == 2
    assert server.events[-1]["event"] == "stopped"
    assert server.events[-1]["status"] == 0


def test_a_dead_worker_stops_the_whole_server_with_status_1(server_factory):
    server = server_factory("--workers", "2")
    victim, survivor = server.wait_event("serving")["worker_pids"]
    os.kill(victim, signal.SIGKILL)
    assert server.process.wait(30) == 1
    exited = server.wait_event("worker_exited")
    assert (exited["worker_pid"], exited["exitcode"], exited["level"]) == (victim, -9, "error")
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)  # the supervisor stopped (and reaped) the other worker too


def test_a_stale_notify_socket_is_logged_not_fatal(server_factory, tmp_path):
    stale = str(tmp_path / "gone.sock")
    server = server_factory("--workers", "1", env=clean_env(NOTIFY_SOCKET=stale))
    failed = server.wait_event("notify_failed")
    assert (failed["level"], failed["state"]) == ("warning", "READY=1")
    channel, stub = fresh_stub(server.target)
    with channel:
        assert stub.SayHello(pb.Mensagem(nome="still"), timeout=5).texto == "Olá, still!"
