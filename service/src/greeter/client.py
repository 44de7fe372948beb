"""What every client command shares: targets, TLS credentials, channels and exit codes."""

import dataclasses
import ipaddress
import json
import socket
from collections.abc import Sequence

import grpc

DEFAULT_PORT = 50051

# Exit codes of the ``greeter`` command (see greeter.cli).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_RPC = 4

# Fleet load: gRPC's own round_robin over every address, skipping a server whose health
# service says NOT_SERVING (it is draining), and retrying a call that found no server ready.
FLEET_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "hello.Greeter"},
        "methodConfig": [
            {
                "name": [{"service": "hello.Greeter"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


class UsageError(Exception):
    """Bad command-line input: exit 2 with this message."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One server address as typed: ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Target":
        text = text.strip()
        host, port = text, str(DEFAULT_PORT)
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise UsageError(f"bad target {text!r}: expected [IPv6]:port")
            port = rest[1:] or port
        elif text.count(":") == 1:
            host, port = text.split(":")
        if not host:
            raise UsageError(f"bad target {text!r}: no host")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError(f"bad target {text!r}: port must be 1-65535")
        return cls(host, int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Tls:
    """Client TLS settings: CA to verify the server, optional client cert for mutual TLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.enabled:
            return None
        if (self.cert is None) != (self.key is None):
            raise UsageError("--cert and --key must be given together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "--ca"),
            private_key=_read(self.key, "--key"),
            certificate_chain=_read(self.cert, "--cert"),
        )


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot read: {error.strerror}") from None


def fleet_uri(targets: Sequence[Target]) -> str:
    """One gRPC target naming every address, e.g. ``ipv4:10.0.0.1:50051,10.0.0.2:50051``.

    Host names are resolved here (first address each) because gRPC's ipv4:/ipv6: schemes take
    addresses only, and one URI holds one address family.
    """
    addresses = []
    for target in targets:
        try:
            ip = ipaddress.ip_address(target.host)
        except ValueError:
            try:
                info = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            except socket.gaierror as error:
                raise UsageError(f"cannot resolve {target.host}: {error.strerror}") from None
            ip = ipaddress.ip_address(info[0][4][0])
        addresses.append(
            (ip.version, f"[{ip}]:{target.port}" if ip.version == 6 else f"{ip}:{target.port}")
        )
    versions = {version for version, _ in addresses}
    if len(versions) > 1:
        raise UsageError("targets mix IPv4 and IPv6 addresses; load one family at a time")
    return f"ipv{versions.pop()}:" + ",".join(address for _, address in addresses)


def open_channel(uri: str, tls: Tls, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to ``uri``, secure when TLS options were given."""
    options = list(options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = tls.credentials()
    if credentials is None:
        return grpc.insecure_channel(uri, options=options)
    return grpc.secure_channel(uri, credentials, options=options)


def open_aio_channel(
    uri: str, tls: Tls, options: Sequence[tuple[str, object]] = ()
) -> grpc.aio.Channel:
    """The asyncio flavour of :func:`open_channel` (the load generator uses it)."""
    options = list(options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = tls.credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(uri, options=options)
    return grpc.aio.secure_channel(uri, credentials, options=options)
