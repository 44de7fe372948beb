"""Bad input against a real greeter-server: every case gets its status and the server survives.

One server (two worker processes sharing the port, as in production) serves the whole module
on a free loopback port. Each abuse runs while well-behaved clients keep calling; after each
test the same workers must still be there and answer a correct call correctly.

Statuses pinned here:
- the service's rules: an empty or whitespace-only nome, or one longer than --max-name-chars
  characters, is INVALID_ARGUMENT; any other nome gets exactly "Olá, <nome>!";
- a request larger than --max-message-bytes is RESOURCE_EXHAUSTED;
- what gRPC itself answers for requests the service never sees (Python gRPC's documented
  behaviour): a body that does not parse as hello.Mensagem (e.g. invalid UTF-8 in the string
  field) is INTERNAL, a unary call without exactly one message is UNIMPLEMENTED, a compressed
  message without grpc-encoding is INTERNAL, an unknown method is UNIMPLEMENTED;
- HTTP/2 protocol violations and non-HTTP/2 bytes end the connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from greeter import hello_pb2
from hardening_support import (
    DATA,
    END_HEADERS,
    HEADERS,
    PING,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    client_hello,
    frame,
    goaway_error,
    good_traffic,
    greeting,
    grpc_headers,
    grpc_message,
    hpack,
    nghttp_call,
    pb_string_field,
    raw_unary,
    read_frames,
    say_hello,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import Server

MAX_NAME_CHARS = 40
MAX_MESSAGE_BYTES = 2048
WORKERS = 2
WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())

FAST = settings(
    max_examples=150,
    deadline=5000,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow],
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server(
        "--workers",
        str(WORKERS),
        "--max-name-chars",
        str(MAX_NAME_CHARS),
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        "--grace",
        "2",
    )
    yield running
    status = running.stop()
    assert status == 0, f"greeter-server exited {status} on SIGTERM:\n{running.output()}"


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    # The client may send more than the server accepts: the server must do the refusing.
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def workers(server: Server) -> set[int]:
    return server.pids()


@pytest.fixture(autouse=True)
def still_serving(server: Server, workers: set[int]) -> Iterator[None]:
    """After every test: same processes, and a correct call gets the correct answer."""
    yield
    assert server.alive(), f"greeter-server died:\n{server.output()}"
    assert server.pids() == workers, "a worker process died or was replaced"
    with grpc.insecure_channel(server.target) as fresh:
        for name in ("Ana", "José", "山田"):
            assert say_hello(fresh, name) == greeting(name)


def expected(name: str) -> tuple[grpc.StatusCode, str | None]:
    """The service's documented rule for a nome (see the module docstring)."""
    if not name.strip() or len(name) > MAX_NAME_CHARS:
        return grpc.StatusCode.INVALID_ARGUMENT, None
    return grpc.StatusCode.OK, greeting(name)


def call_status(channel: grpc.Channel, name: str) -> tuple[grpc.StatusCode, str | None]:
    try:
        return grpc.StatusCode.OK, say_hello(channel, name)
    except grpc.RpcError as error:
        return error.code(), None


# ---- names ------------------------------------------------------------------------------
# Proto3 strings must be valid UTF-8, so surrogates cannot be sent as strings (hypothesis's
# text() leaves them out); everything else can, control characters and NUL included.


@FAST
@given(name=st.text(max_size=MAX_NAME_CHARS + 20))
def test_random_names_get_the_greeting_or_invalid_argument(
    channel: grpc.Channel, name: str
) -> None:
    assert call_status(channel, name) == expected(name)


@FAST
@given(name=st.text(alphabet=WHITESPACE, max_size=MAX_NAME_CHARS + 5))
def test_empty_and_whitespace_only_names_are_invalid_argument(
    channel: grpc.Channel, name: str
) -> None:
    assert call_status(channel, name) == (grpc.StatusCode.INVALID_ARGUMENT, None)


@FAST
@given(
    core=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1),
    pad=st.text(alphabet=WHITESPACE + "\x00\x07\x1b\u200b\ufeff", max_size=5),
)
def test_names_with_control_and_odd_characters_follow_the_same_rule(
    channel: grpc.Channel, core: str, pad: str
) -> None:
    name = pad + core + pad
    assert call_status(channel, name) == expected(name)


@pytest.mark.parametrize("char", ["a", "ç", "山", "😀"])
def test_name_limit_counts_characters_not_bytes(channel: grpc.Channel, char: str) -> None:
    at_limit = char * MAX_NAME_CHARS
    assert call_status(channel, at_limit) == (grpc.StatusCode.OK, greeting(at_limit))
    assert call_status(channel, at_limit + char)[0] == grpc.StatusCode.INVALID_ARGUMENT


def raw_status(channel: grpc.Channel, body: bytes) -> tuple[grpc.StatusCode, bytes | None]:
    try:
        return grpc.StatusCode.OK, raw_unary(channel, body)
    except grpc.RpcError as error:
        return error.code(), None


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FAST
@given(payload=st.binary(min_size=1, max_size=30).filter(lambda b: not is_utf8(b)))
def test_invalid_utf8_in_the_name_field_is_refused(channel: grpc.Channel, payload: bytes) -> None:
    status, _ = raw_status(channel, pb_string_field(1, payload))
    assert status == grpc.StatusCode.INTERNAL


@FAST
@given(body=st.binary(max_size=200))
def test_arbitrary_request_bodies_get_the_status_their_parse_implies(
    channel: grpc.Channel, body: bytes
) -> None:
    """Whatever bytes arrive: if they parse as hello.Mensagem, the name rule applies."""
    status, reply = raw_status(channel, body)
    try:
        name = hello_pb2.Mensagem.FromString(body).nome
    except DecodeError:
        assert status == grpc.StatusCode.INTERNAL
        return
    want_status, want_text = expected(name)
    assert status == want_status
    if reply is not None:
        assert hello_pb2.Resposta.FromString(reply).texto == want_text


@pytest.mark.parametrize("size", [MAX_MESSAGE_BYTES + 1, 64 * 1024, 8 * 1024 * 1024])
def test_oversized_requests_are_resource_exhausted(
    server: Server, channel: grpc.Channel, size: int
) -> None:
    body = pb_string_field(1, b"x" * size)
    with good_traffic(server.target) as traffic:
        status, _ = raw_status(channel, body)
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert traffic.failures == []
    assert traffic.calls > 0


def test_a_name_over_the_limit_but_under_the_message_size_is_invalid_argument(
    channel: grpc.Channel,
) -> None:
    name = "n" * (MAX_NAME_CHARS * 10)
    assert len(hello_pb2.Mensagem(nome=name).SerializeToString()) < MAX_MESSAGE_BYTES
    assert call_status(channel, name) == (grpc.StatusCode.INVALID_ARGUMENT, None)


# ---- malformed gRPC messages inside valid HTTP/2 (sent with nghttp) ------------------------

GOOD_BODY = hello_pb2.Mensagem(nome="Ana").SerializeToString()

MALFORMED = {
    # case: (request body, extra headers, grpc-status expected)
    "length prefix longer than the body": (grpc_message(GOOD_BODY, length=1000), {}, "12"),
    "length prefix of 4 GiB": (grpc_message(GOOD_BODY, length=0xFFFFFFFF), {}, "8"),
    "truncated prefix": (b"\x00\x00", {}, "12"),
    "empty body": (b"", {}, "12"),
    "two messages in a unary call (Python gRPC reads the first)": (
        grpc_message(GOOD_BODY) * 2,
        {},
        "0",
    ),
    "compressed flag without grpc-encoding": (grpc_message(GOOD_BODY, compressed=1), {}, "13"),
    "gzip flag with bytes that are not gzip": (
        grpc_message(b"not gzip at all", compressed=1),
        {"grpc-encoding": "gzip"},
        "13",
    ),
    "unknown grpc-encoding": (
        grpc_message(zlib.compress(GOOD_BODY), compressed=1),
        {"grpc-encoding": "snappy"},
        "13",
    ),
    "invalid UTF-8 in the name": (grpc_message(pb_string_field(1, b"\xff\xfe")), {}, "13"),
    "whitespace-only name": (
        grpc_message(hello_pb2.Mensagem(nome=" \t").SerializeToString()),
        {},
        "3",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_grpc_messages_get_their_status(server: Server, case: str) -> None:
    body, headers, status = MALFORMED[case]
    with good_traffic(server.target) as traffic:
        answer = nghttp_call(server.port, body, headers)
    assert answer.get(":status") == "200", answer
    assert answer.get("grpc-status") == status, answer
    assert traffic.failures == []
    assert traffic.calls > 0


def test_a_well_formed_hand_built_request_gets_the_greeting(server: Server) -> None:
    """The raw path itself works, so the refusals above are about the malformation."""
    answer = nghttp_call(server.port, grpc_message(GOOD_BODY))
    assert answer.get("grpc-status") == "0", answer


@pytest.mark.parametrize("path", ["/hello.Greeter/Nope", "/nope.Service/SayHello", "/", "/x" * 500])
def test_unknown_methods_are_unimplemented(server: Server, path: str) -> None:
    answer = nghttp_call(server.port, grpc_message(GOOD_BODY), path=path)
    assert answer.get("grpc-status") == "12", answer


# ---- bytes that are not (valid) HTTP/2 on the port ------------------------------------------

RANDOM_CASES = 20


def _settings() -> bytes:
    return PREFACE + frame(SETTINGS, 0, 0, b"")


def _request_headers(port: int) -> bytes:
    return hpack(grpc_headers(port))


REFUSED = {
    "HTTP/1.1 GET": lambda port: b"GET / HTTP/1.1\r\nHost: greeter\r\n\r\n",
    "HTTP/1.1 POST of a gRPC body": lambda port: (
        b"POST /hello.Greeter/SayHello HTTP/1.1\r\nHost: greeter\r\n"
        b"Content-Type: application/grpc\r\nContent-Length: 10\r\n\r\n" + grpc_message(GOOD_BODY)
    ),
    "TLS ClientHello to the plaintext port": lambda port: client_hello(),
    "frame larger than SETTINGS_MAX_FRAME_SIZE": lambda port: (
        _settings() + frame(DATA, 0, 1, b"x" * 20000)
    ),
    "SETTINGS with a bad ENABLE_PUSH value": lambda port: (
        PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 7))
    ),
    "SETTINGS of a length that is not a multiple of 6": lambda port: (
        PREFACE + frame(SETTINGS, 0, 0, b"\x00\x01\x02")
    ),
    "WINDOW_UPDATE of zero on the connection": lambda port: (
        _settings() + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0))
    ),
    "HEADERS with a broken HPACK block": lambda port: (
        _settings() + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff")
    ),
    "HEADERS whose length prefix lies": lambda port: (
        _settings() + frame(HEADERS, END_HEADERS, 1, _request_headers(port), length=3)
    ),
}


def _exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[list, bool, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(OSError):  # the server may close before it has read it all
            sock.sendall(data)
        frames, closed = read_frames(sock, timeout)
    return frames, closed, time.monotonic() - started


@pytest.mark.parametrize("case", list(REFUSED))
def test_protocol_violations_end_the_connection(server: Server, case: str) -> None:
    with good_traffic(server.target) as traffic:
        frames, closed, took = _exchange(server.port, REFUSED[case](server.port))
    assert closed, f"connection still open after {took:.1f}s: {frames}"
    # Nothing the server sent back may carry a response message (a DATA frame on stream 1).
    assert not [f for f in frames if f[0] == DATA and f[2] == 1]
    assert goaway_error(frames) in (None, "PROTOCOL_ERROR", "FRAME_SIZE_ERROR", "COMPRESSION_ERROR")
    assert traffic.failures == []
    assert traffic.calls > 0


def test_random_bytes_on_the_port_end_the_connection(server: Server) -> None:
    seeds = [
        os.urandom(size) for size in (1, 24, 512, 4096, 65536) for _ in range(RANDOM_CASES // 5)
    ]
    with good_traffic(server.target) as traffic:
        for data in seeds:
            # Bytes that happen to start like the preface are not random garbage.
            if PREFACE.startswith(data[:24]):
                continue
            wait = 10 if len(data) >= len(PREFACE) else 1
            _, closed, took = _exchange(server.port, data, timeout=wait)
            # One byte cannot be refused yet (it could be the start of a preface): the server
            # waits for more; every longer prefix that is not the preface is refused.
            if len(data) >= len(PREFACE):
                assert closed, f"{len(data)} random bytes left the connection open ({took:.1f}s)"
    assert traffic.failures == []
    assert traffic.calls > 0


def test_ping_and_settings_floods_do_not_hurt_other_clients(server: Server) -> None:
    flood = _settings() + b"".join(
        frame(PING, 0, 0, struct.pack(">Q", i)) + frame(SETTINGS, 0, 0, b"") for i in range(2000)
    )
    with good_traffic(server.target) as traffic:
        _exchange(server.port, flood, timeout=3)
    assert traffic.failures == []
    assert traffic.calls > 0


def test_half_open_connections_do_not_starve_other_clients(server: Server) -> None:
    """200 connections that stop somewhere in the preface and stay open."""
    idle: list[socket.socket] = []
    try:
        for index in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(PREFACE[: index % len(PREFACE)])
            idle.append(sock)
        with good_traffic(server.target, clients=8) as traffic:
            time.sleep(3)
    finally:
        for sock in idle:
            sock.close()
    assert traffic.failures == []
    assert traffic.calls > 50, f"only {traffic.calls} good calls in 3 s"


STALLED_CONNECTIONS = 4
STALLED_STREAMS = 25


def test_requests_that_never_send_their_body_do_not_starve_other_clients(server: Server) -> None:
    """100 calls whose HEADERS arrive but whose message never does (4 connections x 25).

    A slow or hostile client can do this with a few hundred bytes; it must not take the
    handler capacity every other client needs. (Python's sync gRPC server parks one pool
    thread per such call until the body arrives; grpc.aio parks a coroutine.)
    """
    stalled: list[socket.socket] = []
    try:
        headers = _request_headers(server.port)
        for _ in range(STALLED_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(
                _settings()
                + b"".join(
                    frame(HEADERS, END_HEADERS, 2 * i + 1, headers) for i in range(STALLED_STREAMS)
                )
            )
            stalled.append(sock)
        time.sleep(0.5)
        with good_traffic(server.target, clients=8) as traffic:
            time.sleep(3)
    finally:
        for sock in stalled:
            sock.close()
    assert traffic.failures == [], f"{len(traffic.failures)} of {traffic.calls} good calls failed"
    assert traffic.calls > 50, f"only {traffic.calls} good calls in 3 s"
