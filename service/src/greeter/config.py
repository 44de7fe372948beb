"""``greeter-server`` settings: each flag has an environment variable of the same meaning.

The systemd unit passes settings through an EnvironmentFile, people pass flags; a flag wins
over its variable. Every value is checked before anything starts, so a typo such as
``GREETER_PORT=abc`` stops the server with one clear line instead of a half-started service.
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

LOG_LEVELS = ("debug", "info", "warning", "error")


def _default_workers() -> int:
    # The CPUs this process may run on (taskset, cpusets), not every CPU of the machine.
    return len(os.sched_getaffinity(0))


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"{low}-{high}" if high is not None else f">= {low}"
            raise ValueError(f"expected an integer {bound}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _bind(text: str) -> str:
    host = text.strip()
    if not host:
        raise ValueError("expected an address to bind, got an empty string")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address: gRPC wants it bracketed before ":port"
    return host


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def _path(text: str) -> str | None:
    return text or None  # an empty variable in an EnvironmentFile means "not set"


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its flag, its environment variable, how to parse it and its default."""

    name: str
    env: str
    parse: Callable[[str], Any]
    default: Callable[[], Any]
    help: str


OPTIONS = (
    Option("bind", "GREETER_BIND", _bind, lambda: "[::]", "address to listen on"),
    Option("port", "GREETER_PORT", _int_in(1, 65535), lambda: 50051, "TCP port"),
    Option(
        "workers",
        "GREETER_WORKERS",
        _int_in(1, 256),
        _default_workers,
        "server processes sharing the port with SO_REUSEPORT (default: one per usable CPU)",
    ),
    Option(
        "threads",
        "GREETER_THREADS",
        _int_in(1, 1024),
        lambda: 4,
        "handler threads per process; more are added only while all are stuck (see pool.py)",
    ),
    Option(
        "max_message_bytes",
        "GREETER_MAX_MESSAGE_BYTES",
        _int_in(64, 64 * 1024 * 1024),
        lambda: 64 * 1024,
        "largest request accepted; larger ones get RESOURCE_EXHAUSTED",
    ),
    Option(
        "max_name_chars",
        "GREETER_MAX_NAME_CHARS",
        _int_in(1, 1024 * 1024),
        lambda: 256,
        "longest nome accepted; longer ones get INVALID_ARGUMENT",
    ),
    Option("tls_cert", "GREETER_TLS_CERT", _path, lambda: None, "PEM certificate chain (TLS)"),
    Option("tls_key", "GREETER_TLS_KEY", _path, lambda: None, "PEM private key (TLS)"),
    Option(
        "tls_client_ca",
        "GREETER_TLS_CLIENT_CA",
        _path,
        lambda: None,
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
    ),
    Option(
        "grace", "GREETER_GRACE", _seconds, lambda: 10.0, "seconds in-flight calls get to finish"
    ),
    Option(
        "drain_delay",
        "GREETER_DRAIN_DELAY",
        _seconds,
        lambda: 0.0,
        "seconds between reporting NOT_SERVING and refusing new calls on SIGTERM",
    ),
    Option(
        "log_level", "GREETER_LOG_LEVEL", _log_level, lambda: "info", "debug/info/warning/error"
    ),
    Option(
        "metrics_port",
        "GREETER_METRICS_PORT",
        _int_in(0, 65535),
        lambda: 0,
        "TCP port serving Prometheus metrics at /metrics on the --bind address (0: off)",
    ),
    Option(
        "revision",
        "GREETER_REVISION",
        str.strip,
        lambda: "",
        "the git commit this release was built from, reported by GetVersion",
    ),
    Option(
        "release",
        "GREETER_RELEASE",
        str.strip,
        lambda: "",
        "the release this server runs (<commit>-<config digest>), reported by GetVersion",
    ),
)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Checked settings of one ``greeter-server`` run."""

    bind: str
    port: int
    workers: int
    threads: int
    max_message_bytes: int
    max_name_chars: int
    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    grace: float
    drain_delay: float
    log_level: str
    metrics_port: int
    revision: str
    release: str

    @property
    def address(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.bind}:{self.metrics_port}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: it lands in the journal as a single entry.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _flag_type(option: Option) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return option.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def parse_args(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> ServerConfig:
    """Settings from flags, then ``GREETER_*`` variables, then defaults; exit 2 on bad input."""
    environ = dict(os.environ if environ is None else environ)
    parser = _Parser(
        prog="greeter-server",
        description="Serve hello.Greeter, grpc.health.v1 and server reflection.",
        epilog="Each flag can also be set by the environment variable shown; the flag wins.",
    )
    for option in OPTIONS:
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            dest=option.name,
            type=_flag_type(option),
            default=None,
            metavar=option.env,
            help=option.help,
        )
    parser.add_argument("--version", action="version", version=_package_version())
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for option in OPTIONS:
        value = getattr(args, option.name)
        if value is None and option.env in environ:
            try:
                value = option.parse(environ[option.env])
            except ValueError as error:
                parser.error(f"{option.env}={environ[option.env]!r}: {error}")
        values[option.name] = option.default() if value is None else value
    config = ServerConfig(**values)
    if (config.tls_cert is None) != (config.tls_key is None):
        parser.error("--tls-cert and --tls-key (GREETER_TLS_CERT/KEY) must be given together")
    if config.metrics_port == config.port:
        parser.error(
            f"--metrics-port (GREETER_METRICS_PORT) must differ from --port, got {config.port}"
        )
    if config.tls_client_ca and not config.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    return config


def _package_version() -> str:
    from greeter import __version__  # noqa: PLC0415 -- keep import-time work small

    return f"greeter {__version__}"


def fail(message: str, status: int = 2) -> NoReturn:
    """Print ``greeter-server: error: message`` on stderr and exit."""
    print(f"greeter-server: error: {message}", file=sys.stderr)
    sys.exit(status)
