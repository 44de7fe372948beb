"""Helpers for the hardening tests: a real greeter-server, raw HTTP/2 and steady good traffic.

No HTTP/2 library is installed on purpose: frames are built by hand here (RFC 9113 framing,
RFC 7541 literal header fields without Huffman), which is exactly what lets a test send what
a well-behaved library never would. Responses that need full HPACK decoding (grpc-status in
trailers) are read with `nghttp` from nghttp2-client, which lab/host-deps installs.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from greeter import hello_pb2, hello_pb2_grpc

# Shared with the other suites (tests/support); still importable from here.
from support.net import free_port  # noqa: F401
from support.server import Server  # noqa: F401

BIN = pathlib.Path(sys.executable).parent
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# HTTP/2 frame types and the error codes a GOAWAY may carry (RFC 9113 section 6, 7).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
H2_ERRORS = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    6: "FRAME_SIZE_ERROR",
    9: "COMPRESSION_ERROR",
    11: "ENHANCE_YOUR_CALM",
}


def greeting(name: str) -> str:
    """The one greeting the contract promises (hello.proto: 'Olá, <nome>!')."""
    return f"Olá, {name}!"


def say_hello(channel: grpc.Channel, name: str, timeout: float = 10.0) -> str:
    return (
        hello_pb2_grpc.GreeterStub(channel)
        .SayHello(hello_pb2.Mensagem(nome=name), timeout=timeout)
        .texto
    )


def raw_unary(channel: grpc.Channel, body: bytes, timeout: float = 10.0) -> bytes:
    """Call SayHello with a request body built by hand (no client-side serialization)."""
    call = channel.unary_unary("/hello.Greeter/SayHello")
    return call(body, timeout=timeout)


def pb_string_field(number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field, any bytes inside (the wire does not check UTF-8)."""
    return varint((number << 3) | 2) + varint(len(payload)) + payload


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# ---- HTTP/2 by hand ---------------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    """One HTTP/2 frame; `length` lets a test lie about the payload size."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing and without Huffman: valid, and simple."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00"
        for text in (name.encode(), value.encode()):
            out += _hpack_int(len(text), 7) + text
    return bytes(out)


def grpc_headers(port: int, path: str = "/hello.Greeter/SayHello") -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", f"127.0.0.1:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def grpc_message(body: bytes, compressed: int = 0, length: int | None = None) -> bytes:
    """The gRPC length-prefixed message (5-byte prefix), optionally with a lying length."""
    return bytes([compressed]) + struct.pack(">I", len(body) if length is None else length) + body


def read_frames(
    sock: socket.socket, timeout: float
) -> tuple[list[tuple[int, int, int, bytes]], bool]:
    """Read frames until the peer closes, sends GOAWAY, or `timeout` passes.

    Returns (frames, closed): closed is True when the connection ended or a GOAWAY arrived,
    which is the server refusing the connection in an orderly way.
    """
    frames: list[tuple[int, int, int, bytes]] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return frames, True
        if not chunk:
            return frames, True
        buffer += chunk
        while len(buffer) >= 9:
            size = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + size:
                break
            kind, flags = buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            frames.append((kind, flags, stream, buffer[9 : 9 + size]))
            buffer = buffer[9 + size :]
            if kind == GOAWAY:
                return frames, True
    return frames, False


def goaway_error(frames: list[tuple[int, int, int, bytes]]) -> str | None:
    for kind, _, _, payload in frames:
        if kind == GOAWAY and len(payload) >= 8:
            code = int.from_bytes(payload[4:8], "big")
            return H2_ERRORS.get(code, str(code))
    return None


def client_hello() -> bytes:
    """The bytes a real TLS client sends first (a TLS ClientHello aimed at our plaintext port)."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def nghttp_call(
    port: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    path: str = "/hello.Greeter/SayHello",
) -> dict[str, str]:
    """POST one gRPC request with nghttp and return the response headers and trailers."""
    nghttp = shutil.which("nghttp")
    assert nghttp, "nghttp missing: run lab/host-deps (make test does)"
    wanted = {"content-type": "application/grpc", "te": "trailers", **(headers or {})}
    with tempfile.NamedTemporaryFile(suffix=".bin") as data:
        data.write(body)
        data.flush()
        argv = [nghttp, "-v", "-n", "-t", "10", "-H", ":method: POST", "-d", data.name]
        for name, value in wanted.items():
            argv += ["-H", f"{name}: {value}"]
        argv.append(f"http://127.0.0.1:{port}{path}")
        result = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    received: dict[str, str] = {}
    for line in result.stdout.decode(errors="replace").splitlines():
        if "recv (stream_id=" in line and ") " in line:
            header = line.split(") ", 1)[1]
            name, _, value = header.partition(": ")
            if name and not name.startswith(("[", "<")):
                received[name.strip()] = value.strip()
    return received


# ---- good clients that must keep working while the server is abused ----------------------


@dataclass
class Traffic:
    calls: int = 0
    failures: list[str] = field(default_factory=list)


@contextlib.contextmanager
def good_traffic(target: str, clients: int = 4, timeout: float = 30) -> Iterator[Traffic]:
    """Well-behaved clients calling SayHello in a loop, each on its own channel.

    Every answer must be exactly right; any error or wrong text is recorded as a failure.
    The block runs only once every client has had an answer, and ends only once every client
    has had another one, started after the block: so the abuse inside really met live traffic
    and its effect on the next call is seen. A client left without an answer is a failure.
    """
    stats = Traffic()
    stop = threading.Event()
    lock = threading.Lock()
    answered = [0] * clients  # calls answered, per client

    def run(index: int) -> None:
        name = f"bom cliente {index}"
        with grpc.insecure_channel(target) as channel:
            while not stop.is_set():
                try:
                    text = say_hello(channel, name, timeout=10)
                    ok = text == greeting(name)
                    problem = None if ok else f"wrong text {text!r}"
                except grpc.RpcError as error:
                    problem = f"{error.code()}: {error.details()}"
                with lock:
                    stats.calls += 1
                    answered[index] += 1
                    if problem:
                        stats.failures.append(problem)
                time.sleep(0.005)

    def wait_for_calls(wanted: list[int], when: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if all(done >= want for done, want in zip(answered, wanted, strict=True)):
                    return
            time.sleep(0.01)
        with lock:
            stats.failures.append(f"a good client got no answer {when} within {timeout} s")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        wait_for_calls([1] * clients, "before the abuse")
        yield stats
        with lock:
            # +2: the call in progress when the block ended may have started before it.
            after = [done + 2 for done in answered]
        wait_for_calls(after, "after the abuse")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
