"""Service benchmark: ``greeter-server`` against the original student design, in the same run.

Setup (issue 6): the server is pinned to CPU 0 with ``taskset``, the load generator to CPU 1.
h2load (C, nghttp2) sends real unary gRPC calls; ``greeter bench`` (the project's own Python load
tool) runs at the same levels. Rounds are interleaved (baseline, candidate, baseline, ...) and each
server is started fresh for its round, so drift on a shared machine hits both alike.

h2load checks only the HTTP status, so every h2load run is also checked for gRPC correctness:
each call it counts as succeeded must have carried exactly one response message of the expected
size (a gRPC error has a 200 status but no message), one call's trailers must say
``grpc-status: 0``, and a real ``greeter hello`` must answer before and after each server's round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from greeter import hello_pb2, hello_pb2_grpc

from bench.common import (
    REPO,
    RESULTS,
    BenchError,
    Target,
    fmt_range,
    machine_info,
    machine_line,
    markdown_table,
    percentile,
    ratios,
    summary,
    write_results,
)

NAME = "bench"
EXPECTED_TEXT = f"Olá, {NAME}!"
BIN = Path(sys.executable).parent
# calls in flight -> (connections, streams per connection). One gRPC channel is one HTTP/2
# connection, so 1 and 50 use one connection; 500 uses ten so SO_REUSEPORT has some to spread.
LEVELS: dict[int, tuple[int, int]] = {1: (1, 1), 50: (1, 50), 500: (10, 50)}
SERVER_CPU = "0"
DRIVER_CPU = "1"
BOTH_CPUS = "0,1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: flag byte 0 (uncompressed), 4-byte big-endian length."""
    return b"\0" + struct.pack(">I", len(message)) + message


REQUEST = grpc_frame(hello_pb2.Mensagem(nome=NAME).SerializeToString())
RESPONSE_BYTES = len(grpc_frame(hello_pb2.Resposta(texto=EXPECTED_TEXT).SerializeToString()))


def free_port() -> int:
    """A loopback port nobody listens on right now (other engineers run servers here too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the servers -------------------------------------------------------------------------------


class NotConnectedError(BenchError):
    """h2load could not open its connections, or got no call through them (seen rarely here on a
    busy machine, with nothing failed): retried."""


@dataclass
class ServerSpec:
    """How to start one server under test on a given port."""

    name: str
    argv: list[str]
    cpus: str = SERVER_CPU

    @property
    def metrics(self) -> bool:
        return "{metrics_port}" in self.argv

    def command(self, port: int, metrics_port: int = 0) -> list[str]:
        argv = [a.format(port=port, metrics_port=metrics_port) for a in self.argv]
        return ["taskset", "-c", self.cpus, *argv]


def baseline_spec(cpus: str = SERVER_CPU) -> ServerSpec:
    script = str(REPO / "bench" / "baseline_server.py")
    return ServerSpec("baseline", [sys.executable, script, "--port", "{port}"], cpus)


def candidate_spec(workers: int = 1, cpus: str = SERVER_CPU, metrics: bool = False) -> ServerSpec:
    argv = [str(BIN / "greeter-server"), "--bind", "127.0.0.1", "--port", "{port}"]
    argv += ["--workers", str(workers), "--grace", "1"]
    name = f"greeter-server --workers {workers}"
    if metrics:
        argv += ["--metrics-port", "{metrics_port}"]
        name += " --metrics-port"
    return ServerSpec(name, argv, cpus)


def process_tree(root: int) -> list[int]:
    """The server's pid and every descendant (its worker processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += children
        frontier = children
    return tree


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of one process, in MiB; 0 once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


class Server:
    """A server under test: started pinned, ready when a real SayHello answers, stopped by pid."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.metrics_port = free_port() if spec.metrics else 0
        self.log_path = log_dir / f"{spec.name.replace(' ', '_')}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.spec.command(self.port, self.metrics_port),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.spec.name} exited {self.proc.returncode}: {self.tail()}")
            try:
                if say_hello(self.port, timeout=1.0) == EXPECTED_TEXT:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.spec.name} did not serve within {timeout:.0f}s: {self.tail()}")

    def pids(self) -> list[int]:
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in reversed(self.pids()):
                os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@contextmanager
def running(spec: ServerSpec, log_dir: Path) -> Iterator[Server]:
    server = Server(spec, log_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- correctness -------------------------------------------------------------------------------


def say_hello(port: int, timeout: float) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = hello_pb2_grpc.GreeterStub(channel)
        return stub.SayHello(hello_pb2.Mensagem(nome=NAME), timeout=timeout).texto


def verify(port: int) -> None:
    """A real client call through the project's CLI, and one call's trailers read by nghttp."""
    done = subprocess.run(
        [str(BIN / "greeter"), "hello", f"127.0.0.1:{port}", NAME],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0 or EXPECTED_TEXT not in done.stdout:
        raise BenchError(f"greeter hello failed ({done.returncode}): {done.stdout}{done.stderr}")
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(REQUEST)
        body.flush()
        dump = subprocess.run(
            ["nghttp", "-v", *_grpc_headers(), "-d", body.name, _url(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    if "grpc-status: 0" not in dump.stdout:
        raise BenchError(f"trailers of a SayHello call lack grpc-status 0:\n{dump.stdout[-1500:]}")


def handled_ok(metrics_port: int) -> float:
    """SayHello calls a metrics-on server's one scrape counts as handled with status OK."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels.get("grpc_method") == "SayHello"
        and sample.labels.get("grpc_code") == "OK"
    )


# --- the load generators -----------------------------------------------------------------------


def _grpc_headers() -> list[str]:
    return ["-H", "content-type: application/grpc", "-H", "te: trailers"]


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}/hello.Greeter/SayHello"


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_DATA = re.compile(r"traffic: .*\((\d+)\) data")


def parse_h2load(stdout: str, log_lines: list[str], duration: float) -> dict:
    """Calls/s and latency percentiles from h2load's summary and its per-request log.

    Raises BenchError when any call failed or when the succeeded calls did not each carry one
    response message: h2load counts a gRPC error (HTTP 200, no message) as a success.
    """
    found = _REQUESTS.search(stdout)
    data = _DATA.search(stdout)
    if not found or not data:
        raise BenchError(f"cannot read h2load's summary:\n{stdout[-1500:]}")
    _, started, _, succeeded, failed, errored, timeouts = (int(g) for g in found.groups())
    data_bytes = int(data.group(1))
    if started == 0:
        raise NotConnectedError(f"h2load started no call ({errored} errored)")
    if not (succeeded or failed or errored or timeouts):
        raise NotConnectedError(f"h2load started {started} calls and finished none")
    if failed or errored or timeouts or not succeeded:
        raise BenchError(
            f"h2load: {succeeded} succeeded, {failed} failed, {errored} errored, "
            f"{timeouts} timed out"
        )
    # Calls cut off by the end of the run may have received their message but not their
    # trailers, so up to `started` messages can have arrived, never fewer than `succeeded`.
    if not succeeded * RESPONSE_BYTES <= data_bytes <= started * RESPONSE_BYTES:
        raise BenchError(
            f"h2load: {data_bytes} bytes of messages for {succeeded} succeeded calls; expected "
            f"{RESPONSE_BYTES} each: some calls returned no message (a gRPC error)"
        )
    latencies = sorted(
        int(cols[2]) / 1000 for cols in (line.split("\t") for line in log_lines) if cols[1] == "200"
    )
    return {
        "calls": succeeded,
        "calls_per_s": succeeded / duration,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1],
    }


def run_h2load(port: int, in_flight: int, duration: float, cpus: str = DRIVER_CPU) -> dict:
    """Unary SayHello calls from h2load for `duration` seconds at `in_flight` calls in flight."""
    connections, streams = LEVELS[in_flight]
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        body, log = Path(tmp) / "request.grpc", Path(tmp) / "requests.tsv"
        body.write_bytes(REQUEST)
        millis = f"{round(duration * 1000)}ms"  # h2load takes no fractions of a second
        argv = ["taskset", "-c", cpus, "h2load", "-D", millis, "-c", str(connections),
                "-m", str(streams), *_grpc_headers(), "-d", str(body), f"--log-file={log}",
                _url(port)]  # fmt: skip
        for attempt in range(3):
            log.unlink(missing_ok=True)
            before = os.times()
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=duration + 60, check=False
            )
            after = os.times()
            if done.returncode != 0:
                raise BenchError(f"h2load exited {done.returncode}: {done.stderr[-1500:]}")
            try:
                lines = log.read_text().splitlines() if log.exists() else []
                result = parse_h2load(done.stdout, lines, duration)
                break
            except NotConnectedError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        result["connect_retries"] = attempt
    driver_cpu = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    result["driver_cpu_share"] = driver_cpu / duration
    result["connections"], result["streams"] = connections, streams
    return result


def run_greeter_bench(port: int, in_flight: int, duration: float, procs: int = 1) -> dict:
    """The project's own load tool at the same level, pinned like h2load, read from its JSON."""
    connections, _ = LEVELS[in_flight]
    done = subprocess.run(
        ["taskset", "-c", DRIVER_CPU, str(BIN / "greeter"), "bench", f"127.0.0.1:{port}",
         "-z", f"{round(duration * 1000)}ms", "-c", str(in_flight),
         "--connections", str(connections), "--procs", str(procs), "--name", NAME, "--json"],
        capture_output=True, text=True, timeout=duration + 60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"greeter bench exited {done.returncode}: {done.stderr[-1500:]}")
    report = json.loads(done.stdout)
    if report["errors"] or report["status_codes"] != {"OK": report["count"]}:
        raise BenchError(f"greeter bench saw failed calls: {report['status_codes']}")
    return {
        "calls": report["count"],
        "calls_per_s": report["rps"],
        "p50_ms": report["percentiles_ms"]["p50"],
        "p99_ms": report["percentiles_ms"]["p99"],
    }


class RssSampler:
    """Largest VmRSS of each server process while a load runs (workers are sampled too)."""

    def __init__(self, server: Server, every: float = 0.2) -> None:
        self.server, self.every = server, every
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.server.pids():
                self.peak[pid] = max(self.peak.get(pid, 0.0), rss_mb(pid))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# --- rounds ------------------------------------------------------------------------------------


@dataclass
class Config:
    rounds: int = 5
    duration: float = 4.0
    warmup: float = 1.0
    levels: list[int] = field(default_factory=lambda: [1, 50, 500])
    greeter_bench: bool = True
    # Two asyncio processes on the driver's one core keep more calls in flight than one
    # (measured: 1.03x of h2load at 50 in flight against 0.90x with one process).
    bench_procs: int = 2
    scaling: bool = True
    # greeter-server with --metrics-port against without, h2load at 50 and 500 in flight.
    metrics: bool = True
    saturated: float = 0.85
    retries: int = 2
    log_dir: Path = RESULTS / "logs"


def loaded(server: Server, need: float, cfg: Config, load: Callable[[], dict]) -> dict:
    """Run one load and account the server's CPU; retry one that another process disturbed.

    At 50 calls in flight and more, a CPU-bound server uses all the cores it is pinned to;
    when it got less than ``need`` cores, something else on this shared machine took them and
    the figure would measure that. Such a run is repeated (``cfg.retries`` times at most) and
    the retries are recorded; the last attempt counts whatever it shows.
    """
    for attempt in range(cfg.retries + 1):
        start = cpu_seconds(server.pids())
        result = load()
        used = cpu_seconds(server.pids()) - start
        result["server_cpu_share"] = used / cfg.duration
        result["server_cpu_us_per_call"] = used / result["calls"] * 1e6
        result["disturbed_retries"] = attempt
        if result["server_cpu_share"] >= need:
            break
        print(
            f"service: {server.spec.name} got {result['server_cpu_share']:.2f} of a core's "
            f"time (wants {need:.2f}): the machine is busy, measuring again",
            file=sys.stderr,
            flush=True,
        )
    return result


def measure_round(spec: ServerSpec, cfg: Config) -> dict:
    """One server, fresh: verify, warm up, every level with h2load then greeter bench, verify."""
    out: dict = {"h2load": {}, "greeter_bench": {}, "loadavg_1m_before": os.getloadavg()[0]}
    with running(spec, cfg.log_dir) as server:
        verify(server.port)
        succeeded = run_h2load(server.port, 50, cfg.warmup)["calls"]
        for level in cfg.levels:
            need = cfg.saturated if level >= 50 else 0.0  # 1 in flight does not fill a core
            with RssSampler(server) as sampler:
                result = loaded(
                    server, need, cfg, lambda lv=level: run_h2load(server.port, lv, cfg.duration)
                )
            result["rss_mb"] = sorted(sampler.peak.values(), reverse=True)
            out["h2load"][level] = result
            succeeded += result["calls"]
            if cfg.greeter_bench:
                procs = min(cfg.bench_procs, level)  # 1 in flight is one process's work
                out["greeter_bench"][level] = loaded(
                    server,
                    need,
                    cfg,
                    lambda lv=level, n=procs: run_greeter_bench(server.port, lv, cfg.duration, n),
                )
        verify(server.port)
        out["processes"] = len(server.pids())
        if spec.metrics:
            # The metrics must have counted every call h2load saw succeed (and the few more it
            # cut off at the end of each run), or the cheap figure would measure nothing.
            time.sleep(1.5)  # the workers flush their counts every 0.5 s
            out["metrics_handled_ok"] = handled_ok(server.metrics_port)
            if out["metrics_handled_ok"] < succeeded:
                raise BenchError(
                    f"{spec.name}: the scrape counts {out['metrics_handled_ok']:.0f} OK calls, "
                    f"h2load saw {succeeded} succeed"
                )
    return out


def measure_scaling(cfg: Config) -> dict:
    """2 worker processes against 1 at 500 in flight, both servers and h2load on both CPUs.

    Two Python processes need two cores, and there are only two, so the driver has to share
    them: h2load (C, a fraction of a core) runs unpinned next to the server on CPUs 0-1 for both
    servers alike. The ratio is what a second process buys on this 2-core machine, driver
    included; the driver's CPU share is reported next to it.
    """
    one, two = candidate_spec(1, BOTH_CPUS), candidate_spec(2, BOTH_CPUS)
    runs: dict[str, list[dict]] = {"1": [], "2": []}
    for _ in range(cfg.rounds):
        for key, spec in (("1", one), ("2", two)):
            need = cfg.saturated * int(key) - (0.2 if key == "2" else 0.0)  # h2load's share
            with running(spec, cfg.log_dir) as server:
                run_h2load(server.port, 500, cfg.warmup, BOTH_CPUS)
                result = loaded(
                    server,
                    need,
                    cfg,
                    lambda s=server: run_h2load(s.port, 500, cfg.duration, BOTH_CPUS),
                )
                result["processes"] = len(server.pids())
                verify(server.port)
            runs[key].append(result)
    return runs


def summarise(rounds: list[dict], scaling: dict | None, cfg: Config) -> dict:
    """Medians, ranges and per-round ratios of everything the tables and targets need."""
    base = [r["baseline"] for r in rounds]
    cand = [r["candidate"] for r in rounds]

    def series(runs: list[dict], tool: str, level: int, key: str) -> list[float]:
        return [run[tool][level][key] for run in runs]

    levels: dict = {}
    for level in cfg.levels:
        entry: dict = {}
        for tool in ("h2load", "greeter_bench") if cfg.greeter_bench else ("h2load",):
            b_rate, c_rate = (
                series(base, tool, level, "calls_per_s"),
                series(cand, tool, level, "calls_per_s"),
            )
            b_p99, c_p99 = series(base, tool, level, "p99_ms"), series(cand, tool, level, "p99_ms")
            entry[tool] = {
                "baseline_calls_per_s": summary(b_rate),
                "candidate_calls_per_s": summary(c_rate),
                "calls_ratio": summary(ratios(c_rate, b_rate)),
                "baseline_p99_ms": summary(b_p99),
                "candidate_p99_ms": summary(c_p99),
                "p99_ratio": summary(ratios(c_p99, b_p99)),
            }
        b_cpu = series(base, "h2load", level, "server_cpu_us_per_call")
        c_cpu = series(cand, "h2load", level, "server_cpu_us_per_call")
        entry["baseline_cpu_us_per_call"] = summary(b_cpu)
        entry["candidate_cpu_us_per_call"] = summary(c_cpu)
        entry["cpu_per_call_ratio"] = summary(ratios(c_cpu, b_cpu))
        entry["candidate_server_cpu_share"] = summary(
            series(cand, "h2load", level, "server_cpu_share")
        )
        entry["baseline_server_cpu_share"] = summary(
            series(base, "h2load", level, "server_cpu_share")
        )
        levels[level] = entry
    out: dict = {"levels": levels}
    with_metrics = [r for r in rounds if "metrics" in r]
    if with_metrics:
        out["metrics"] = {}
        for level in with_metrics[0]["metrics"]["h2load"]:
            on = [r["metrics"]["h2load"][level] for r in with_metrics]
            off = [r["candidate"]["h2load"][level] for r in with_metrics]
            on_rate, off_rate = [x["calls_per_s"] for x in on], [x["calls_per_s"] for x in off]
            on_cpu = [x["server_cpu_us_per_call"] for x in on]
            off_cpu = [x["server_cpu_us_per_call"] for x in off]
            out["metrics"][level] = {
                "off_calls_per_s": summary(off_rate),
                "on_calls_per_s": summary(on_rate),
                "calls_ratio": summary(ratios(on_rate, off_rate)),
                "cpu_per_call_ratio": summary(ratios(on_cpu, off_cpu)),
            }
    control = [r["control"] for r in rounds if "control" in r]
    if control:
        out["control_vs_baseline_1"] = summary(
            ratios(
                series(control, "h2load", 1, "calls_per_s"),
                series(base, "h2load", 1, "calls_per_s"),
            )
        )
    if cfg.greeter_bench and 50 in cfg.levels:
        out["greeter_bench_vs_h2load_50"] = summary(
            ratios(
                series(cand, "greeter_bench", 50, "calls_per_s"),
                series(cand, "h2load", 50, "calls_per_s"),
            )
        )
    out["disturbed_retries"] = sum(
        run[tool][level]["disturbed_retries"]
        for run in base + cand + control + [r["metrics"] for r in with_metrics]
        for tool in ("h2load", "greeter_bench")
        for level in run[tool]
    ) + sum(r["disturbed_retries"] for key in (scaling or {}) for r in scaling[key])
    top = max(cfg.levels)
    out["rss_mb_at"] = top
    out["candidate_rss_mb"] = summary([max(run["h2load"][top]["rss_mb"]) for run in cand])
    out["baseline_rss_mb"] = summary([max(run["h2load"][top]["rss_mb"]) for run in base])
    out["candidate_processes"] = cand[0]["processes"]
    if scaling:
        one = [r["calls_per_s"] for r in scaling["1"]]
        two = [r["calls_per_s"] for r in scaling["2"]]
        out["scaling"] = {
            "one_worker_calls_per_s": summary(one),
            "two_workers_calls_per_s": summary(two),
            "ratio": summary(ratios(two, one)),
            "one_worker_server_cpu": summary([r["server_cpu_share"] for r in scaling["1"]]),
            "two_workers_server_cpu": summary([r["server_cpu_share"] for r in scaling["2"]]),
            "driver_cpu_with_two": summary([r["driver_cpu_share"] for r in scaling["2"]]),
            "two_workers_processes": scaling["2"][0]["processes"],
        }
    return out


def targets(s: dict, cfg: Config) -> list[Target]:
    """Issue 6's service targets, each against the median of the per-round ratios."""
    found = [
        Target(f"greeter-server calls/s at {level} in flight vs baseline (h2load)",
               s["levels"][level]["h2load"]["calls_ratio"]["median"], ">=", 1.0, "x")
        for level in cfg.levels
    ]  # fmt: skip
    if 50 in cfg.levels:
        found.append(
            Target("greeter-server p99 at 50 in flight vs baseline (h2load)",
                   s["levels"][50]["h2load"]["p99_ratio"]["median"], "<=", 1.0, "x")
        )  # fmt: skip
    if "scaling" in s:
        found.append(
            Target(
                "2 workers vs 1 at 500 in flight", s["scaling"]["ratio"]["median"], ">=", 1.7, "x"
            )
        )
    for level, entry in s.get("metrics", {}).items():
        found.append(
            Target(f"greeter-server calls/s with metrics on vs off at {level} in flight (h2load)",
                   entry["calls_ratio"]["median"], ">=", 0.95, "x")
        )  # fmt: skip
    if "greeter_bench_vs_h2load_50" in s:
        found.append(
            Target("greeter bench vs h2load calls/s at 50 in flight",
                   s["greeter_bench_vs_h2load_50"]["median"], ">=", 0.8, "x")
        )  # fmt: skip
    found.append(
        Target(f"greeter-server RSS per process at {s['rss_mb_at']} in flight",
               s["candidate_rss_mb"]["max"], "<=", 100.0, " MB")
    )  # fmt: skip
    return found


def table(s: dict, cfg: Config) -> str:
    """The Markdown table for stdout and the README."""
    rows = []
    for level in cfg.levels:
        conns, streams = LEVELS[level]
        for tool, label in (("h2load", "h2load"), ("greeter_bench", "greeter bench")):
            e = s["levels"][level].get(tool)
            if not e:
                continue
            cpu = s["levels"][level]["cpu_per_call_ratio"] if tool == "h2load" else None
            rows.append([
                f"{level} ({conns}x{streams})", label,
                f"{e['baseline_calls_per_s']['median']:,.0f}",
                fmt_range(e["calls_ratio"]),
                f"{e['baseline_p99_ms']['median']:.1f}",
                fmt_range(e["p99_ratio"]),
                fmt_range(cpu) if cpu else "",
            ])  # fmt: skip
    text = markdown_table(
        ["in flight (conns x streams)", "driver", "baseline calls/s", "greeter-server calls/s",
         "baseline p99 ms", "greeter-server p99", "server CPU per call"],
        rows,
    )  # fmt: skip
    text += (
        "\n\ngreeter-server columns: ratio to the baseline, median of the per-round ratios "
        f"(min-max over {cfg.rounds} interleaved rounds of {cfg.duration:g} s)."
    )
    rss, base_rss = s["candidate_rss_mb"], s["baseline_rss_mb"]
    extra = [
        f"- greeter-server RSS per process at {s['rss_mb_at']} in flight: "
        f"{fmt_range(rss, 1, ' MB')} ({s['candidate_processes']} process(es)); "
        f"baseline {fmt_range(base_rss, 1, ' MB')}",
    ]
    if "control_vs_baseline_1" in s:
        ratio = fmt_range(s["control_vs_baseline_1"])
        extra.append(f"- noise: the baseline against a second baseline at 1 in flight: {ratio}")
    if "greeter_bench_vs_h2load_50" in s:
        ratio = fmt_range(s["greeter_bench_vs_h2load_50"])
        extra.append(f"- greeter bench vs h2load at 50 in flight, same server: {ratio}")
    if "scaling" in s:
        sc = s["scaling"]
        one, two = sc["one_worker_calls_per_s"]["median"], sc["two_workers_calls_per_s"]["median"]
        extra.append(
            f"- 2 workers vs 1 at 500 in flight (server and h2load on CPUs 0-1): "
            f"{fmt_range(sc['ratio'])}; {one:,.0f} vs {two:,.0f} calls/s; server CPU "
            f"{sc['one_worker_server_cpu']['median']:.2f} vs "
            f"{sc['two_workers_server_cpu']['median']:.2f} cores, "
            f"h2load {sc['driver_cpu_with_two']['median']:.2f} core"
        )
    for level, entry in s.get("metrics", {}).items():
        extra.append(
            f"- metrics on (`--metrics-port`) vs off at {level} in flight (h2load): calls/s "
            f"{fmt_range(entry['calls_ratio'])} ({entry['off_calls_per_s']['median']:,.0f} off); "
            f"server CPU per call {fmt_range(entry['cpu_per_call_ratio'])}"
        )
    extra.append(
        f"- measurements repeated because another process took the server's CPU: "
        f"{s['disturbed_retries']}"
    )
    return text + "\n\n" + "\n".join(extra)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="bench/run service", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--levels", default="1,50,500", help="calls in flight (default: 1,50,500)")
    parser.add_argument(
        "--bench-procs", type=int, default=2, help="greeter bench --procs (default: 2)"
    )
    parser.add_argument("--no-greeter-bench", action="store_true", help="h2load only")
    parser.add_argument("--no-scaling", action="store_true", help="skip 2 workers vs 1")
    parser.add_argument(
        "--no-metrics", action="store_true", help="skip metrics on vs off (50, 500 in flight)"
    )
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    if args.rounds < 1 or args.duration <= 0 or not set(levels) <= set(LEVELS):
        parser.error(f"need --rounds >= 1, --duration > 0, levels among {sorted(LEVELS)}")
    return Config(
        rounds=args.rounds,
        duration=args.duration,
        levels=levels,
        greeter_bench=not args.no_greeter_bench,
        bench_procs=args.bench_procs,
        scaling=not args.no_scaling,
        metrics=not args.no_metrics,
    )


def run(cfg: Config) -> tuple[str, list[Target]]:
    """Measure, store the JSON section, and return the table and the checked targets."""
    for tool in ("h2load", "nghttp", "taskset"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":")):
            raise BenchError(f"{tool} is missing: run `make host-deps` (Debian nghttp2-client)")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 CPUs: the server on CPU 0, the load on CPU 1")
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    rounds = []
    for i in range(cfg.rounds):
        pair = {}
        servers = [("baseline", baseline_spec(), cfg), ("candidate", candidate_spec(), cfg)]
        if 1 in cfg.levels:
            # A second baseline at 1 in flight, h2load only: how far noise alone moves a ratio.
            servers.append(
                ("control", baseline_spec(), replace(cfg, levels=[1], greeter_bench=False))
            )
        metrics_levels = [level for level in cfg.levels if level >= 50]
        if cfg.metrics and metrics_levels:
            # The candidate with metrics on; its rounds pair with the candidate's (h2load).
            servers.append(
                (
                    "metrics",
                    candidate_spec(metrics=True),
                    replace(cfg, levels=metrics_levels, greeter_bench=False),
                )
            )
        turn = i % len(servers)  # each server goes first in some rounds
        for key, spec, round_cfg in servers[turn:] + servers[:turn]:
            print(f"service: round {i + 1}/{cfg.rounds}: {key}", file=sys.stderr, flush=True)
            pair[key] = measure_round(spec, round_cfg)
        rounds.append(pair)
    scaling = None
    if cfg.scaling:
        print("service: 2 workers vs 1", file=sys.stderr, flush=True)
        scaling = measure_scaling(cfg)
    s = summarise(rounds, scaling, cfg)
    checked = targets(s, cfg)
    write_results(
        "service",
        {
            "machine": machine,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
            "levels_connections_streams": LEVELS,
            "summary": s,
            "rounds": rounds,
            "scaling_rounds": scaling,
            "targets": [t.as_dict() for t in checked],
        },
    )
    text = f"## Service ({machine_line(machine)})\n\n{table(s, cfg)}"
    return text, checked
