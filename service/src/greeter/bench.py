"""``greeter bench``: a load generator in the spirit of ghz, for one server or a fleet.

How it loads: ``-c`` calls are kept in flight at all times, spread over ``--connections``
channels (each its own TCP connection), by ``-c`` asyncio tasks on ``grpc.aio`` channels, each
starting its next call as soon as the previous one ends. Measured here against one server, that
cost the server ~10% less CPU per call than completion callbacks on ``stub.SayHello.future``
(more calls arrive together) and the client no more, so it got closer to h2load.
``--procs P`` splits the calls, the concurrency and the connections over P processes and merges
their latencies, for when one Python process cannot keep up with the servers.

Several targets become one channel per connection with gRPC's round_robin over every address,
client-side health checking (a draining server, NOT_SERVING, stops getting calls) and a retry
policy for UNAVAILABLE, so a rolling restart of the fleet under load fails no call.

Every call made is counted: ``count`` is the number of calls that finished (any status), and
the latency figures include failed calls, as ghz does; ``status_codes`` splits them.
"""

import array
import asyncio
import dataclasses
import itertools
import math
import multiprocessing
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from greeter import hello_pb2 as pb
from greeter import hello_pb2_grpc as pb_grpc
from greeter.client import FLEET_SERVICE_CONFIG, Target, Tls, fleet_uri, open_aio_channel

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
HISTOGRAM_BUCKETS = 10
PROGRESS_AFTER_S = 3.0


class ConnectError(Exception):
    """No channel became ready: exit 3."""


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """One bench run, as given on the command line (picklable for --procs)."""

    targets: tuple[Target, ...]
    tls: Tls
    concurrency: int = 50
    total: int | None = 200
    duration: float | None = None
    connections: int = 1
    warmup_calls: int = 0
    warmup_seconds: float = 0.0
    name: str = "bench"
    deadline: float = 20.0
    connect_timeout: float = 10.0
    rate: float = 0.0  # calls/s in all; 0: each slot calls again as soon as its call ends

    @property
    def fleet(self) -> bool:
        return len(self.targets) > 1

    def share(self, index: int, parts: int) -> "LoadSpec":
        """This process's part of the load when it is split over ``parts`` processes."""

        def split(value: int) -> int:
            return value // parts + (1 if index < value % parts else 0)

        return dataclasses.replace(
            self,
            concurrency=split(self.concurrency),
            total=None if self.total is None else split(self.total),
            connections=max(1, split(self.connections)),
            warmup_calls=split(self.warmup_calls),
            rate=self.rate * split(self.concurrency) / self.concurrency,
        )


@dataclasses.dataclass
class RunResult:
    """Raw outcome of a run: per-call latencies (seconds) and failures."""

    latencies: array.array
    failures: Counter  # (code name, details) -> count
    started: float  # time.monotonic() (one clock for every process of a machine)
    finished: float


class _Load:
    """Keeps ``concurrency`` calls in flight until the count or the time is used up (with a
    ``rate``, each slot starts a call every concurrency/rate seconds: a steady load)."""

    def __init__(
        self,
        stubs: Sequence[pb_grpc.GreeterStub],
        request: pb.Mensagem,
        *,
        concurrency: int,
        total: int | None,
        duration: float | None,
        deadline: float,
        rate: float = 0.0,
    ) -> None:
        self._period = concurrency / rate if rate else 0.0
        self._calls = [stub.SayHello for stub in stubs]
        self._request = request
        self._concurrency = concurrency
        self._total = total
        self._duration = duration
        self._deadline = deadline
        self._claims = itertools.count()
        self._end = math.inf
        self.latencies: list[float] = []
        self.failures: list[tuple[str, str]] = []

    async def run(self) -> RunResult:
        started = time.monotonic()
        if self._duration is not None:
            self._end = time.perf_counter() + self._duration
        calls = self._calls
        await asyncio.gather(*(self._loop(calls[i % len(calls)]) for i in range(self._concurrency)))
        finished = time.monotonic()
        return RunResult(
            array.array("d", self.latencies), Counter(self.failures), started, finished
        )

    async def _loop(self, call: Any) -> None:
        """One slot: call after call, each started as soon as the previous one ends (or, with a
        rate, when its turn comes)."""
        request, deadline, total, end = self._request, self._deadline, self._total, self._end
        latencies, claims, clock = self.latencies, self._claims, time.perf_counter
        period, due = self._period, clock()
        while (total is None or next(claims) < total) and clock() < end:
            started = clock()
            try:
                await call(request, timeout=deadline)
            except grpc.aio.AioRpcError as error:
                self.failures.append((error.code().name, error.details() or ""))
            latencies.append(clock() - started)
            if period:
                due += period
                await asyncio.sleep(min(due, end) - clock())

    def progress(self) -> int:
        return len(self.latencies)


def _channels(spec: LoadSpec) -> list[grpc.aio.Channel]:
    options: list[tuple[str, object]] = [("grpc.use_local_subchannel_pool", 1)]
    if spec.fleet:
        uri = fleet_uri(spec.targets)
        options.append(("grpc.service_config", FLEET_SERVICE_CONFIG))
    else:
        uri = str(spec.targets[0])
    return [open_aio_channel(uri, spec.tls, options) for _ in range(spec.connections)]


async def _wait_ready(channels: Sequence[grpc.aio.Channel], timeout: float) -> None:
    """Return once every channel is READY; fail fast if one cannot connect at all."""
    deadline = time.monotonic() + timeout
    for channel in channels:
        state = channel.get_state(try_to_connect=True)
        while state is not grpc.ChannelConnectivity.READY:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise ConnectError("connection failed (refused, unreachable or TLS handshake)")
            try:
                await asyncio.wait_for(
                    channel.wait_for_state_change(state), deadline - time.monotonic()
                )
            except asyncio.TimeoutError:
                raise ConnectError(f"no connection within {timeout:g} s") from None
            state = channel.get_state(try_to_connect=True)


async def _run_async(
    spec: LoadSpec,
    on_start: Callable[[Callable[[], int]], None] | None,
    before_load: Callable[[], None] | None,
) -> RunResult:
    channels = _channels(spec)
    try:
        await _wait_ready(channels, spec.connect_timeout)
        stubs = [pb_grpc.GreeterStub(channel) for channel in channels]
        request = pb.Mensagem(nome=spec.name)
        if spec.warmup_calls or spec.warmup_seconds:
            await _Load(
                stubs,
                request,
                concurrency=spec.concurrency,
                total=spec.warmup_calls or None,
                duration=None if spec.warmup_calls else spec.warmup_seconds,
                deadline=spec.deadline,
            ).run()
        if before_load:
            before_load()
        load = _Load(
            stubs,
            request,
            concurrency=spec.concurrency,
            total=spec.total,
            duration=spec.duration,
            deadline=spec.deadline,
            rate=spec.rate,
        )
        if on_start:
            on_start(load.progress)
        return await load.run()
    finally:
        for channel in channels:
            await channel.close()


def run_in_process(
    spec: LoadSpec,
    on_start: Callable[[Callable[[], int]], None] | None = None,
    before_load: Callable[[], None] | None = None,
) -> RunResult:
    """Run ``spec`` in this process: connect, warm up, then measure."""
    return asyncio.run(_run_async(spec, on_start, before_load))


def _child(spec: LoadSpec, index: int, parts: int, shared: tuple[Any, Any, Any]) -> None:
    """One process of a --procs run: its share of the load, results back on ``queue``."""
    barrier, queue, counts = shared
    stop = threading.Event()

    def publish(progress: Callable[[], int]) -> None:
        def loop() -> None:
            while not stop.wait(0.25):
                counts[index] = progress()

        threading.Thread(target=loop, daemon=True).start()

    try:
        result = run_in_process(spec.share(index, parts), publish, barrier.wait)
        queue.put(
            (index, result.latencies.tobytes(), result.failures, result.started, result.finished)
        )
    except Exception as error:  # the parent reports it and exits non-zero
        barrier.abort()
        queue.put((index, error, None, 0.0, 0.0))
    finally:
        stop.set()


def run_processes(spec: LoadSpec, procs: int, progress: "Progress") -> RunResult:
    """Split the load over ``procs`` processes (spawned: gRPC does not survive fork)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(procs)
    queue = context.Queue()
    counts = context.Array("q", procs, lock=False)
    children = [
        context.Process(target=_child, args=(spec, i, procs, (barrier, queue, counts)), daemon=True)
        for i in range(procs)
    ]
    for child in children:
        child.start()
    progress.start(lambda: sum(counts))
    try:
        parts = [queue.get() for _ in children]
    finally:
        progress.stop()
        for child in children:
            child.join(5)
    errors = [part[1] for part in parts if isinstance(part[1], Exception)]
    if errors:  # the cause, not the other processes' broken barrier
        errors.sort(key=lambda error: isinstance(error, threading.BrokenBarrierError))
        raise errors[0]
    latencies = array.array("d")
    failures: Counter = Counter()
    for _, raw, part_failures, _, _ in parts:
        latencies.frombytes(raw)
        failures.update(part_failures)
    return RunResult(
        latencies, failures, min(part[3] for part in parts), max(part[4] for part in parts)
    )


class Progress:
    """A line on stderr each second once a run has lasted a few seconds."""

    def __init__(self, total: int | None, stream: Any = sys.stderr) -> None:
        self._total = total
        self._stream = stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    def start(self, count: Callable[[], int]) -> None:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, args=(count,), daemon=True)
        self._thread.start()

    def _loop(self, count: Callable[[], int]) -> None:
        tty = self._stream.isatty()
        if self._stop.wait(PROGRESS_AFTER_S):
            return
        while True:
            done = count()
            elapsed = time.monotonic() - self._started
            of = f"/{self._total}" if self._total else ""
            line = f"  {elapsed:5.1f} s  {done}{of} calls  {done / elapsed:,.0f} calls/s"
            self._stream.write(f"\r{line}" if tty else f"{line}\n")
            self._stream.flush()
            self._shown = True
            if self._stop.wait(1.0 if tty else 5.0):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._shown and self._stream.isatty():
            self._stream.write("\n")


def run(spec: LoadSpec, procs: int = 1) -> RunResult:
    """Run the load, in this process or split over ``procs`` processes."""
    progress = Progress(spec.total)
    if procs > 1:
        return run_processes(spec, procs, progress)
    try:
        return run_in_process(spec, progress.start)
    finally:
        progress.stop()


def report(result: RunResult, spec: LoadSpec, procs: int = 1) -> dict[str, Any]:
    """The ghz-like summary of a run, as a JSON-ready dict (latencies in ms)."""
    latencies = sorted(result.latencies)
    count = len(latencies)
    total_s = max(result.finished - result.started, 1e-9)
    codes: Counter = Counter({"OK": count - sum(result.failures.values())})
    codes += Counter()  # drops a zero OK count
    errors: Counter = Counter()
    for (code, details), n in result.failures.items():
        codes[code] += n
        errors[f"{code}: {details}"] += n
    summary: dict[str, Any] = {
        "targets": [str(target) for target in spec.targets],
        "options": {
            "concurrency": spec.concurrency,
            "total": spec.total,
            "duration_s": spec.duration,
            "connections": spec.connections,
            "procs": procs,
            "tls": spec.tls.enabled,
        },
        "count": count,
        "total_s": round(total_s, 6),
        "rps": round(count / total_s, 2),
        "average_ms": _ms(sum(latencies) / count) if count else None,
        "fastest_ms": _ms(latencies[0]) if count else None,
        "slowest_ms": _ms(latencies[-1]) if count else None,
        "percentiles_ms": {f"p{p}": _ms(_percentile(latencies, p)) for p in PERCENTILES}
        if count
        else {},
        "histogram": _histogram(latencies),
        "status_codes": dict(codes.most_common()) if count else {},
        "errors": dict(errors.most_common()),
    }
    return summary


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _percentile(ordered: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def _histogram(ordered: Sequence[float]) -> list[dict[str, float]]:
    """Ten equal-width buckets from fastest to slowest (ghz's shape): upper bound and count."""
    if not ordered:
        return []
    low, high = ordered[0], ordered[-1]
    width = (high - low) / HISTOGRAM_BUCKETS or 1e-9
    counts = [0] * HISTOGRAM_BUCKETS
    for value in ordered:
        counts[min(int((value - low) / width), HISTOGRAM_BUCKETS - 1)] += 1
    return [
        {"le_ms": _ms(low + width * (i + 1)), "count": counts[i]} for i in range(HISTOGRAM_BUCKETS)
    ]


def format_report(summary: dict[str, Any]) -> str:
    """The report for people, laid out like ghz's."""
    lines = [
        "Summary:",
        f"  Targets:      {', '.join(summary['targets'])}",
        f"  Count:        {summary['count']}",
        f"  Total:        {summary['total_s'] * 1000:.2f} ms",
    ]
    if summary["count"]:
        lines += [
            f"  Slowest:      {summary['slowest_ms']:.2f} ms",
            f"  Fastest:      {summary['fastest_ms']:.2f} ms",
            f"  Average:      {summary['average_ms']:.2f} ms",
        ]
    lines += [f"  Requests/sec: {summary['rps']:.2f}", "", "Response time histogram:"]
    biggest = max((bucket["count"] for bucket in summary["histogram"]), default=0)
    for bucket in summary["histogram"]:
        bar = "∎" * round(40 * bucket["count"] / biggest) if biggest else ""
        lines.append(f"  {bucket['le_ms']:10.3f} [{bucket['count']}]\t|{bar}")
    lines += ["", "Latency distribution:"]
    for name, value in summary["percentiles_ms"].items():
        lines.append(f"  {name[1:]:>2} % in {value:.2f} ms")
    lines += ["", "Status code distribution:"]
    for code, count in summary["status_codes"].items():
        lines.append(f"  [{code}]\t{count} responses")
    if summary["errors"]:
        lines += ["", "Error distribution:"]
        for error, count in summary["errors"].items():
            lines.append(f"  [{count}]\t{error}")
    return "\n".join(lines)
