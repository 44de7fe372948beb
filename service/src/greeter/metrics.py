"""Prometheus metrics of ``greeter-server`` (``--metrics-port``), one scrape for every worker.

Each process that serves calls counts them with a server interceptor and moves the counts every
``FLUSH_SECONDS`` into prometheus_client's multiprocess files (memory-mapped, one per process, in
a fresh directory the server creates at start and removes at exit); the process that answers
``/metrics`` (the supervisor, or the only process with ``--workers 1``) merges every worker's
files at each scrape, so one scrape shows the whole server. The series follow
go-grpc-prometheus' names, so its dashboards work:

- ``grpc_server_started_total``: calls that reached the server and named a known method;
- ``grpc_server_handled_total``: calls a handler finished, by ``grpc_code``. Calls gRPC itself
  ends before a handler runs (a request over ``--max-message-bytes`` gets RESOURCE_EXHAUSTED from
  gRPC's core; a client cancels first) are never seen with their status by Python: they are the
  difference started - handled;
- ``grpc_server_handling_seconds``: from a call's arrival (before it waits for a handler thread)
  to its handler's return, so time queued under overload is in it;
- ``grpc_server_calls_in_flight``: calls that arrived and are not done: queued for a handler
  thread, waiting for their request message, or being handled;
- ``greeter_build_info``: ``version`` and ``commit`` of the release.

Only the unary methods the server names are measured (the Greeter's, health ``Check``);
streams (health ``Watch``, reflection) pass through untouched: their length is the client's
choice, not a latency.
prometheus_client is imported only when metrics are on, after the directory is set, because it
picks its multiprocess mode when first imported.
"""

import bisect
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from greeter import __version__

DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
LABELS = ("grpc_type", "grpc_service", "grpc_method")
# Seconds; a call here takes ~0.3 ms alone and ~100 ms queued at 500 in flight on one core.
# How often each server process moves its numbers into the files the scrape reads.
FLUSH_SECONDS = 0.5
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def create_directory() -> str:
    """A fresh, empty directory for this run's multiprocess files, named in the environment.

    Under systemd it lives in the unit's RuntimeDirectory (tmpfs; the rest of /run is read-only
    for the service), elsewhere in the temp directory. Fresh per start, so no counts of an
    earlier run (or of a crashed one) can leak into this run's numbers.
    """
    directory = tempfile.mkdtemp(
        prefix="greeter-metrics-", dir=os.environ.get("RUNTIME_DIRECTORY") or None
    )
    os.environ[DIRECTORY_VARIABLE] = directory
    return directory


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def start_endpoint(bind: str, port: int, commit: str) -> None:
    """Serve ``/metrics`` on ``bind:port`` from a daemon thread: every worker's numbers merged."""
    from prometheus_client import (  # noqa: PLC0415 -- only when on, after create_directory
        CollectorRegistry,
        Info,
        multiprocess,
        start_http_server,
    )

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    # Kept by this process (an Info has no multiprocess file): one series, not one per worker.
    Info("greeter_build", "The running release", registry=registry).info(
        {"version": __version__, "commit": commit}
    )
    start_http_server(port, addr=bind.strip("[]"), registry=registry)


class _Counts:
    """One thread's running totals for one method; only that thread ever writes them."""

    __slots__ = ("buckets", "ended", "handled", "ok", "seconds", "started")

    def __init__(self) -> None:
        self.started = 0  # calls that arrived (counted by gRPC's serving thread)
        self.ended = 0  # calls gRPC is done with, handled or not
        self.ok = 0  # calls whose handler returned OK (a plain number: hashing an enum is slow)
        self.handled: dict[grpc.StatusCode, int] = {}  # calls whose handler ended otherwise
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0


class _Method:
    """One unary method: its own handler, per-thread running totals, and what was flushed.

    Each thread adds to its own plain numbers, without a lock (~2 us a call); writing each call
    into prometheus_client's memory-mapped values instead cost ~12 us a call, 15% of the
    server's CPU per call (bench/service.py). The flush thread adds the totals' growth to those
    values every ``FLUSH_SECONDS``, so a scrape is at most about that much behind.
    """

    def __init__(self, metrics: "CallMetrics", path: str) -> None:
        service, _, name = path.lstrip("/").rpartition("/")
        self.labels = ("unary", service, name)
        self.handler: Any = None  # the method's own handler, looked up at its first call
        self._local = threading.local()
        self._all: list[_Counts] = []
        self._all_lock = threading.Lock()
        self._flushed = _Counts()
        self._series = (
            metrics.started.labels(*self.labels),
            metrics.latency.labels(*self.labels),
            metrics.in_flight.labels(*self.labels),
        )
        self._handled = metrics.handled

    def counts(self) -> _Counts:
        """This thread's totals for this method."""
        try:
            return self._local.counts
        except AttributeError:
            counts = self._local.counts = _Counts()
            with self._all_lock:
                self._all.append(counts)
            return counts

    def flush(self) -> None:
        """Add the totals' growth since the last flush to the multiprocess values."""
        total = _Counts()
        with self._all_lock:
            every = list(self._all)
        # Every thread's ended calls are read before any started ones: a call that ends in
        # between shows as still in flight, never as minus one.
        for counts in every:
            total.ended += counts.ended
        for counts in every:
            total.started += counts.started
        for counts in every:
            for code, count in dict(counts.handled).items():
                total.handled[code] = total.handled.get(code, 0) + count
            total.handled[grpc.StatusCode.OK] = total.handled.get(grpc.StatusCode.OK, 0) + counts.ok
            for index, count in enumerate(list(counts.buckets)):
                total.buckets[index] += count
            total.seconds += counts.seconds
        done, self._flushed = self._flushed, total
        started, latency, in_flight = self._series
        if total.started > done.started:
            started.inc(total.started - done.started)
        for code, count in total.handled.items():
            if count > done.handled.get(code, 0):  # (so no OK series before the first OK call)
                self._handled.labels(*self.labels, code.name).inc(count - done.handled.get(code, 0))
        # observe() takes one call at a time; a flush adds many, so it adds to the histogram's
        # own per-bucket values, as observe() does (prometheus_client 0.26, pinned).
        for bucket, now, before in zip(latency._buckets, total.buckets, done.buckets, strict=True):
            if now > before:
                bucket.inc(now - before)
        if total.seconds > done.seconds:
            latency._sum.inc(total.seconds - done.seconds)
        in_flight.set(total.started - total.ended)


class _Call:
    """The handler gRPC runs for one call: the method's own, timed from the call's arrival.

    Duck-types grpc.RpcMethodHandler (gRPC reads only these attributes); a small object per
    call is cheaper than copying the method's handler namedtuple.
    """

    __slots__ = ("_arrived", "_method", "request_deserializer", "response_serializer")
    request_streaming = False
    response_streaming = False
    unary_stream = None
    stream_unary = None
    stream_stream = None

    def __init__(self, method: _Method, arrived: float) -> None:
        self._method = method
        self._arrived = arrived
        self.request_deserializer = method.handler.request_deserializer
        self.response_serializer = method.handler.response_serializer

    def __del__(self) -> None:
        # gRPC drops its last reference when it is done with the call: after the handler, or
        # without running it (request too large, client gone). Counting here, not in the
        # handler, keeps calls that never reach a handler from staying "in flight" for ever.
        self._method.counts().ended += 1

    def unary_unary(self, request: Any, context: grpc.ServicerContext) -> Any:
        method = self._method
        failed = True
        try:
            response = method.handler.unary_unary(request, context)
            failed = False
            return response
        finally:
            seconds = time.perf_counter() - self._arrived
            counts = method.counts()
            code = context.code()  # set by abort() or set_code(); None when neither ran
            if code is None and not failed:
                counts.ok += 1
            else:  # None here: an exception, which gRPC answers UNKNOWN
                code = code or grpc.StatusCode.UNKNOWN
                counts.handled[code] = counts.handled.get(code, 0) + 1
            counts.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
            counts.seconds += seconds


class CallMetrics(grpc.ServerInterceptor):
    """Counts, times and tracks the calls of the given unary methods in this server process.

    The methods' series exist from the start (at 0), and so do this process's multiprocess
    files: a scrape that lists a file while its process is still creating it fails (the
    server answers ``/metrics`` only once every worker has made its files).
    """

    def __init__(self, unary_methods: list[str]) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415 -- see above

        self.started = Counter(
            "grpc_server_started", "Calls started on the server", LABELS, registry=None
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Calls a handler finished, by status code",
            (*LABELS, "grpc_code"),
            registry=None,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Seconds from a call's arrival to its handler's return",
            LABELS,
            buckets=BUCKETS,
            registry=None,
        )
        self.in_flight = Gauge(
            "grpc_server_calls_in_flight",
            "Calls arrived and not done (queued, receiving or being handled)",
            LABELS,
            multiprocess_mode="livesum",
            registry=None,
        )
        self._methods = {path: _Method(self, path) for path in unary_methods}
        threading.Thread(target=self._flush_forever, name="metrics-flush", daemon=True).start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            for method in self._methods.values():
                method.flush()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        arrived = time.perf_counter()
        method = self._methods.get(handler_call_details.method)
        if method is None:
            return continuation(handler_call_details)  # a stream, or no such method
        if method.handler is None:
            method.handler = continuation(handler_call_details)
        method.counts().started += 1
        return _Call(method, arrived)
