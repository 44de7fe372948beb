"""greeter-server answers right, reports health, version and reflection, survives bad input."""

import socket

import grpc
import pytest
from greeter import __version__
from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.GreeterStub(channel)


@pytest.mark.parametrize("name", ["Teste", "Zé", "世界", "🙂 emoji", "a" * 256])
def test_greets_by_name(stub, name):
    assert stub.SayHello(pb.Mensagem(nome=name), timeout=5).texto == f"Olá, {name}!"


@pytest.mark.parametrize("service", ["", "hello.Greeter"])
def test_health_is_serving_overall_and_per_service(server, service):
    with server.channel() as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_greeter(server):
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {service.name for service in answer.list_services_response.service}
    assert {"hello.Greeter", "grpc.health.v1.Health"} <= names


def test_version_reports_package_commit_host_and_pid(stub, server):
    info = stub.GetVersion(pb.VersionRequest(), timeout=5)
    assert info.version == __version__
    assert info.commit == "0123456789abcdef0123456789abcdef01234567"
    assert info.hostname == socket.gethostname()
    assert info.pid == server.process.pid


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("\t\n", "must not be empty"),
        ("a" * 257, "longer than 256"),
        ("é" * 300, "longer than 256"),
    ],
)
def test_bad_names_get_invalid_argument(stub, name, detail):
    with pytest.raises(grpc.RpcError) as failure:
        stub.SayHello(pb.Mensagem(nome=name), timeout=5)
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert detail in failure.value.details()
    assert stub.SayHello(pb.Mensagem(nome="after"), timeout=5).texto == "Olá, after!"


def test_oversized_request_gets_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as failure:
        stub.SayHello(pb.Mensagem(nome="x" * 70_000), timeout=5)
    assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.SayHello(pb.Mensagem(nome="after"), timeout=5).texto == "Olá, after!"


def test_limits_follow_the_flags(server_factory):
    server = server_factory("--workers", "1", "--max-name-chars", "4", "--max-message-bytes", "100")
    with server.channel() as channel:
        stub = pb_grpc.GreeterStub(channel)
        assert stub.SayHello(pb.Mensagem(nome="abcd"), timeout=5).texto == "Olá, abcd!"
        with pytest.raises(grpc.RpcError) as failure:
            stub.SayHello(pb.Mensagem(nome="abcde"), timeout=5)
        assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as failure:
            stub.SayHello(pb.Mensagem(nome="b" * 100), timeout=5)
        assert failure.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64,
        bytes(range(256)) * 16,
        b"",
    ],
)
def test_garbage_on_the_port_does_not_disturb_other_clients(server, stub, garbage):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(garbage)
        # Keep the junk connection open while a real client is served.
        assert stub.SayHello(pb.Mensagem(nome="ok"), timeout=5).texto == "Olá, ok!"
    assert stub.SayHello(pb.Mensagem(nome="ok"), timeout=5).texto == "Olá, ok!"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.text(max_size=300))
def test_any_text_gets_a_greeting_or_invalid_argument(stub, name):
    try:
        answer = stub.SayHello(pb.Mensagem(nome=name), timeout=5)
    except grpc.RpcError as error:
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert not name.strip() or len(name) > 256
    else:
        assert answer.texto == f"Olá, {name}!"
        assert name.strip() and len(name) <= 256
