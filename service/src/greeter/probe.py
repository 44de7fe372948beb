"""``greeter probe``: is each server healthy, correct, and running the expected build?

Per target, over one fresh channel: the health service's status for "hello.Greeter", a
SayHello whose answer must be exactly ``Olá, probe!`` (its round trip is the reported latency),
and GetVersion. Targets are probed in parallel so a fleet takes one deadline, not N.
"""

import dataclasses
import time
from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc
from greeter.client import EXIT_CONNECT, EXIT_OK, EXIT_RPC, Target, Tls, open_channel

PROBE_NAME = "probe"
# Seconds a channel gets to show it is connected after a call ran out of time.
READY_GRACE = 0.1


@dataclasses.dataclass
class ProbeResult:
    """What one target answered; ``ok`` only if every check passed."""

    target: str
    ok: bool = False
    reachable: bool = False
    health: str = ""
    greeting: str = ""
    latency_ms: float | None = None
    version: str = ""
    commit: str = ""
    release: str = ""  # <commit>-<config digest>, as the greeter role names a release
    hostname: str = ""
    pid: int | None = None
    error: str = ""
    # The front door's row says "front-door"; a backend's row its state at the balancer
    # (UP, DOWN, DRAIN, MAINT); empty without a balancer.
    balancer: str = ""


def failed_to_connect(channel: grpc.Channel, error: grpc.RpcError) -> bool:
    """Whether a failed call never reached a server ("cannot connect") rather than was too slow.

    Asked only after a failure. UNAVAILABLE means no connection; after DEADLINE_EXCEEDED, a
    channel that does not turn READY within a moment never connected. (Holding a connectivity
    subscription for every probe instead would cost each one 0.2 s: grpc's close() waits out the
    subscription's polling watch.)
    """
    code = error.code() if isinstance(error, grpc.Call) else None
    if code is grpc.StatusCode.UNAVAILABLE:
        return True
    if code is not grpc.StatusCode.DEADLINE_EXCEEDED:
        return False
    ready = grpc.channel_ready_future(channel)
    try:
        ready.result(timeout=READY_GRACE)
    except grpc.FutureTimeoutError:
        return True
    finally:
        ready.cancel()
    return False


def _error_text(error: grpc.RpcError) -> str:
    if isinstance(error, grpc.Call):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def probe_one(
    target: Target, tls: Tls, deadline: float, expect_commit: str | None = None
) -> ProbeResult:
    """Probe one server; never raises for RPC failures, they become ``error``."""
    result = ProbeResult(target=str(target))
    with open_channel(str(target), tls) as channel:
        try:
            _checks(channel, result, deadline)
        except grpc.RpcError as error:
            result.reachable = not failed_to_connect(channel, error)
            result.error = _error_text(error)
    if not result.error:
        expected = f"Olá, {PROBE_NAME}!"
        if result.health != "SERVING":
            result.error = f"health is {result.health}"
        elif result.greeting != expected:
            result.error = f"SayHello answered {result.greeting!r}, expected {expected!r}"
        elif expect_commit and not _same_commit(result.commit, expect_commit):
            result.error = f"runs commit {result.commit or '(unknown)'}, expected {expect_commit}"
        result.ok = not result.error
    return result


def _checks(channel: grpc.Channel, result: ProbeResult, deadline: float) -> None:
    health_stub = health_pb2_grpc.HealthStub(channel)
    answer = health_stub.Check(
        health_pb2.HealthCheckRequest(service="hello.Greeter"), timeout=deadline
    )
    result.reachable = True
    result.health = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    stub = pb_grpc.GreeterStub(channel)
    started = time.perf_counter()
    reply = stub.SayHello(pb.Mensagem(nome=PROBE_NAME), timeout=deadline)
    result.latency_ms = round((time.perf_counter() - started) * 1000, 3)
    result.greeting = reply.texto
    version = stub.GetVersion(pb.VersionRequest(), timeout=deadline)
    result.version, result.commit, result.release = version.version, version.commit, version.release
    result.hostname, result.pid = version.hostname, version.pid


def _same_commit(actual: str, expected: str) -> bool:
    # Accept an abbreviated SHA (git's shortest unambiguous form is 7 characters).
    expected = expected.strip().lower()
    actual = actual.lower()
    return actual == expected or (len(expected) >= 7 and actual.startswith(expected))


def probe_all(
    targets: Sequence[tuple[Target, Tls]], deadline: float, expect_commit: str | None = None
) -> list[ProbeResult]:
    """Probe every (target, its TLS settings) in parallel; results keep the targets' order."""
    with futures.ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        jobs = [pool.submit(probe_one, t, tls, deadline, expect_commit) for t, tls in targets]
        return [job.result() for job in jobs]


FRONT_DOOR = "front-door"


def with_balancer(
    front: ProbeResult | None, backends: Sequence[ProbeResult], states: dict[str, str]
) -> list[ProbeResult]:
    """The front door's row first, then the backends, each with its state at the balancer.

    A backend the balancer does not send calls to (DOWN, DRAIN, MAINT, or not listed) fails its
    row even if it serves: clients of the front door do not reach it.
    """
    rows = []
    if front is not None:
        front.balancer = FRONT_DOOR
        rows.append(front)
    for result in backends:
        if states:
            result.balancer = states.get(result.target, "ABSENT")
            if result.balancer != "UP":
                result.ok = False
                result.error = result.error or f"{result.balancer} at the balancer"
        rows.append(result)
    return rows


def exit_code(results: Sequence[ProbeResult]) -> int:
    """0 if every target passed, 3 if no target could be reached at all, else 4."""
    if all(result.ok for result in results):
        return EXIT_OK
    if not any(result.reachable for result in results):
        return EXIT_CONNECT
    return EXIT_RPC


def config_digest(release: str) -> str:
    """The configuration half of a release id (<commit>-<config digest>), or ""."""
    commit, _, digest = release.partition("-")
    return digest if commit and digest else ""


def format_table(results: Sequence[ProbeResult]) -> str:
    """A fixed-width table for people. COMMIT and CONFIG together name the release a host runs
    (the greeter role's <commit>-<config digest>): the same commit under another configuration
    is another release."""
    header = (
        "TARGET", "OK", "HEALTH", "LATENCY", "VERSION", "COMMIT", "CONFIG", "HOSTNAME", "PID",
        "ERROR",
    )  # fmt: skip
    balanced = any(r.balancer for r in results)
    if balanced:
        header = (*header[:-1], "BALANCER", header[-1])
    rows = [header]
    for r in results:
        latency = f"{r.latency_ms:.2f} ms" if r.latency_ms is not None else "-"
        rows.append(
            (
                r.target,
                "yes" if r.ok else "NO",
                r.health or "-",
                latency,
                r.version or "-",
                r.commit[:12] or "-",
                config_digest(r.release) or "-",
                r.hostname or "-",
                str(r.pid) if r.pid else "-",
                *([r.balancer or "-"] if balanced else []),
                r.error,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
