"""Filters of the greeter_lb role."""

from __future__ import annotations

import struct

# HTTP/2 frame types and flags (RFC 9113).
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _string(value: str) -> bytes:
    """An HPACK string literal without Huffman coding (all our values are under 127 bytes)."""
    raw = value.encode()
    return bytes([len(raw)]) + raw


def greeter_lb_grpc_health_check(service: str, authority: str = "greeter-lb") -> str:
    """Hex of a whole gRPC health check on a fresh cleartext HTTP/2 connection, for tcp-check.

    The client preface, an empty SETTINGS, then one stream: HEADERS for
    POST /grpc.health.v1.Health/Check and DATA carrying HealthCheckRequest{service} with
    END_STREAM. HPACK without Huffman or indexing, so the bytes read as what they say. gRPC needs
    :authority (grpc-core cancels a stream without it) and te: trailers.
    """
    headers = (
        b"\x83"  # :method POST (static index 3)
        + b"\x86"  # :scheme http (static index 6)
        + b"\x04" + _string("/grpc.health.v1.Health/Check")  # :path, literal, name index 4
        + b"\x01" + _string(authority)  # :authority, literal, name index 1
        + b"\x0f\x10" + _string("application/grpc")  # content-type, name index 31
        + b"\x00" + _string("te") + _string("trailers")  # te: trailers, literal name
    )  # fmt: skip
    name = service.encode()
    request = b"\x0a" + bytes([len(name)]) + name  # HealthCheckRequest field 1 (service)
    message = b"\x00" + struct.pack(">I", len(request)) + request  # gRPC frame, not compressed
    wire = (
        PREFACE
        + _frame(SETTINGS, 0, 0, b"")
        + _frame(HEADERS, END_HEADERS, 1, headers)
        + _frame(DATA, END_STREAM, 1, message)
    )
    return wire.hex()


def greeter_lb_tls_key_matches(cert_pem: str, key_pem: str) -> bool:
    """Whether key_pem is the (unencrypted) private key of cert_pem's first certificate.

    On the controller, with the cryptography package ansible-core itself requires: a wrong pair
    fails the preflight instead of HAProxy's check, after the file was already on the host."""
    from cryptography import x509  # noqa: PLC0415 - only when TLS is on
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    def spki(key: object) -> bytes:
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        return False
    return spki(cert.public_key()) == spki(key.public_key())


def greeter_lb_state_of(servers: dict[str, dict] | None, name: str) -> str:
    """A server's state in greeter_lb_server's `servers`, or ABSENT when the balancer does not
    list it (or runs no HAProxy yet)."""
    return (servers or {}).get(name, {}).get("state", "ABSENT")


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict:
        return {
            "greeter_lb_grpc_health_check": greeter_lb_grpc_health_check,
            "greeter_lb_tls_key_matches": greeter_lb_tls_key_matches,
            "greeter_lb_state_of": greeter_lb_state_of,
        }
