"""Balancer benchmark: gRPC calls through HAProxy as the greeter_lb role configures it, against
calls straight to the backend it fronts, measured in the same rounds (issue 12).

What the balancer fronts: the one backend the direct calls reach. Both paths end in the same
server process, so the pair isolates the hop (HAProxy ending the client's HTTP/2 connection,
choosing a backend per call, and its own HTTP/2 connection to the backend). More backends behind
it would not show the balancer on this machine: two cores cannot give three Python backends a
core each, so such a row would measure the backends fighting over CPU.

Pinning: the backend (``greeter-server --workers 1``) on CPU 0, as in the service benchmark;
HAProxy on CPU 1 next to h2load. In production the balancer is an instance of its own; sharing
the backend's core here would make the comparison measure CPU taken from the backend instead of
the hop. The table shows how much of CPU 1 HAProxy and h2load used, so a saturated CPU 1 shows.

Each round starts a fresh backend and a fresh HAProxy in front of it, checks a real call through
each (``greeter hello`` and one call's ``grpc-status: 0`` trailer), warms up, then at every level
runs h2load direct and through the balancer back to back against the same backend process (which
path goes first turns each round), and checks both again. CPU per call: HAProxy's CPU seconds
(all its processes) over the calls h2load completed, against the backend's CPU seconds over the
same calls in the same measurement.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from bench.common import (
    REPO,
    RESULTS,
    BenchError,
    Target,
    fmt_range,
    machine_info,
    machine_line,
    markdown_table,
    ratios,
    run_watched,
    summary,
    write_results,
)
from bench.service import (
    DRIVER_CPU,
    LEVELS,
    Server,
    ServerSpec,
    candidate_spec,
    cpu_seconds,
    loaded,
    run_h2load,
    running,
    verify,
)

ROLE = REPO / "roles" / "greeter_lb"
BIN = Path(sys.executable).parent
PATHS = ("direct", "balancer")
# The HAProxy backend (section) the role puts the greeter hosts in.
BACKEND = yaml.safe_load((ROLE / "vars" / "main.yml").read_text(encoding="utf-8"))[
    "_greeter_lb_backend"
]


def _load_runtime_api():
    """The role's runtime API client (library/greeter_lb_server.py), so the socket protocol
    lives in one place."""
    path = ROLE / "library" / "greeter_lb_server.py"
    spec = importlib.util.spec_from_file_location("greeter_lb_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runtime_api = _load_runtime_api()


def render_config(path: Path, port: int, backend_ports: list[int], socket: Path) -> None:
    """The balancer's haproxy.cfg from the role's own template, defaults and vars, rendered by
    Ansible's template module with the role's filter plugin, as a deploy renders it.

    What differs from a deployed balancer, and why: it binds 127.0.0.1 on a free port, not
    ``[::]:50051`` (loopback only, on a machine where others run servers); its backends are this
    run's servers on loopback (an inventory of its own, group ``greeter_servers``); the runtime
    API socket and the server-state file live in the run's log folder, not ``/run/haproxy/``
    (another HAProxy on this machine may own those paths). Everything else, checks and timeouts
    included, is the role's.
    """
    backends = {
        f"backend-{i}": {"greeter_backend_address": "127.0.0.1", "greeter_port": backend_port}
        for i, backend_port in enumerate(backend_ports, 1)
    }
    inventory = {
        "all": {
            "hosts": {"bench-lb": {"ansible_connection": "local"}},
            "children": {"greeter_servers": {"hosts": backends}},
        }
    }
    overrides = {
        "greeter_lb_bind": "127.0.0.1",
        "greeter_lb_port": port,
        "_greeter_lb_socket": str(socket),
        "_greeter_lb_states_file": str(socket.with_suffix(".state")),
        "ansible_python_interpreter": sys.executable,
    }
    with tempfile.TemporaryDirectory(prefix="bench-haproxy-") as tmp:
        inventory_path = Path(tmp) / "inventory.json"  # Ansible's yaml inventory reads JSON
        overrides_path = Path(tmp) / "overrides.json"
        inventory_path.write_text(json.dumps(inventory), encoding="utf-8")
        overrides_path.write_text(json.dumps(overrides), encoding="utf-8")
        argv = [
            str(BIN / "ansible"), "bench-lb", "-i", str(inventory_path),
            "-e", f"@{ROLE / 'defaults' / 'main.yml'}", "-e", f"@{ROLE / 'vars' / 'main.yml'}",
            "-e", f"@{overrides_path}",
            "-m", "ansible.builtin.template",
            "-a", f"src={ROLE / 'templates' / 'haproxy.cfg.j2'} dest={path}",
        ]  # fmt: skip
        env = {**os.environ, "ANSIBLE_FILTER_PLUGINS": str(ROLE / "filter_plugins")}
        done = run_watched(argv, 120, cwd=REPO, env=env)
    if done.returncode != 0 or not path.exists():
        raise BenchError(f"rendering haproxy.cfg failed ({done.returncode}):\n{done.stdout}")
    check = run_watched([haproxy_binary(), "-c", "-q", "-f", str(path)], 60)
    if check.returncode != 0:  # the role's own validation (`haproxy -c`) before it lands
        raise BenchError(f"haproxy -c refuses {path}:\n{check.stdout}{check.stderr}")


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if not found:
        raise BenchError("haproxy is missing: run `make host-deps` (Debian haproxy)")
    return found


class Balancer(Server):
    """HAProxy in front of the given backends, started pinned and ready when a real SayHello
    answers through it, stopped by pid like the servers.

    It runs in the foreground in master-worker mode (``-W -db``); the distribution's unit runs
    the same mode under systemd (``-Ws``). Pinned to one CPU, HAProxy starts one thread.
    """

    def __init__(self, backend_ports: list[int], log_dir: Path, cpus: str = DRIVER_CPU) -> None:
        super().__init__(ServerSpec("haproxy", [], cpus), log_dir)
        self.config = log_dir / f"haproxy-{self.port}.cfg"
        self.socket = log_dir / f"haproxy-{self.port}.sock"
        render_config(self.config, self.port, backend_ports, self.socket)
        self.spec.argv = [haproxy_binary(), "-W", "-db", "-f", str(self.config)]

    def counters(self) -> dict[str, int]:
        """HAProxy's own counts over its backend servers (``show stat``): calls sent (stot),
        answered 2xx (hrsp_2xx), and connections it opened to them (connect)."""
        text = runtime_api.command(str(self.socket), "show stat").lstrip("# ")
        rows = [
            row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")
        ]
        if not rows:
            raise BenchError(f"HAProxy's show stat lists no server in backend {BACKEND}:\n{text}")
        keys = ("stot", "hrsp_2xx", "connect")
        return {key: sum(int(row[key] or 0) for row in rows) for key in keys}


@contextmanager
def balancing(backend_ports: list[int], log_dir: Path) -> Iterator[Balancer]:
    balancer = Balancer(backend_ports, log_dir)
    balancer.start()
    try:
        yield balancer
    finally:
        balancer.stop()


# --- rounds ------------------------------------------------------------------------------------


@dataclass
class Config:
    rounds: int = 5
    duration: float = 4.0
    warmup: float = 1.0
    levels: list[int] = field(default_factory=lambda: [50, 500])
    # The backend must get this much of its core in every measurement, through the balancer too
    # (see service.loaded); a run it did not get is repeated at most `retries` times.
    saturated: float = 0.85
    retries: int = 2
    log_dir: Path = RESULTS / "logs"


def measure_path(path: str, level: int, backend: Server, balancer: Balancer, cfg: Config) -> dict:
    """One h2load run direct to the backend, or through the balancer with HAProxy's CPU
    accounted over the same calls (the backend's is accounted by service.loaded)."""
    if path == "direct":
        return run_h2load(backend.port, level, cfg.duration)
    before, start = balancer.counters(), cpu_seconds(balancer.pids())
    result = run_h2load(balancer.port, level, cfg.duration)
    used, after = cpu_seconds(balancer.pids()) - start, balancer.counters()
    # Every call h2load saw succeed must have been answered through HAProxy, or the row would
    # measure something else (a wrong port, a bypass).
    answered = after["hrsp_2xx"] - before["hrsp_2xx"]
    if answered < result["calls"]:
        raise BenchError(
            f"HAProxy answered {answered} calls with 2xx, h2load saw {result['calls']} succeed "
            "through it: the calls did not all go through the balancer"
        )
    result["balancer_answered"] = answered
    result["backend_connections_opened"] = after["connect"] - before["connect"]
    result["balancer_cpu_share"] = used / cfg.duration
    result["balancer_cpu_us_per_call"] = used / result["calls"] * 1e6
    return result


def measure_round(cfg: Config, first: str) -> dict:
    """A fresh backend and HAProxy in front of it; every level direct and through, in turn."""
    out: dict = {path: {} for path in PATHS}
    out["loadavg_1m_before"] = os.getloadavg()[0]
    order = PATHS if first == "direct" else PATHS[::-1]
    with (
        running(candidate_spec(), cfg.log_dir) as backend,
        balancing([backend.port], cfg.log_dir) as balancer,
    ):
        for port in (backend.port, balancer.port):
            verify(port)
        run_h2load(balancer.port, 50, cfg.warmup)  # warms both processes
        for level in cfg.levels:
            need = cfg.saturated if level >= 50 else 0.0  # 1 in flight does not fill a core
            for path in order:
                out[path][level] = loaded(
                    backend, need, cfg, partial(measure_path, path, level, backend, balancer, cfg)
                )
        for port in (backend.port, balancer.port):
            verify(port)
        out["balancer_processes"] = len(balancer.pids())
    return out


def summarise(rounds: list[dict], cfg: Config) -> dict:
    """Medians, ranges and per-round ratios and differences for the table and the targets."""
    levels: dict = {}
    for level in cfg.levels:

        def series(path: str, key: str, lv: int = level) -> list[float]:
            return [r[path][lv][key] for r in rounds]

        d_rate, b_rate = series("direct", "calls_per_s"), series("balancer", "calls_per_s")
        d_p99, b_p99 = series("direct", "p99_ms"), series("balancer", "p99_ms")
        d_p50, b_p50 = series("direct", "p50_ms"), series("balancer", "p50_ms")
        lb_cpu = series("balancer", "balancer_cpu_us_per_call")
        backend_cpu = series("balancer", "server_cpu_us_per_call")
        direct_cpu = series("direct", "server_cpu_us_per_call")
        levels[level] = {
            "direct_calls_per_s": summary(d_rate),
            "balancer_calls_per_s": summary(b_rate),
            "calls_ratio": summary(ratios(b_rate, d_rate)),
            "direct_p99_ms": summary(d_p99),
            "balancer_p99_ms": summary(b_p99),
            "p99_added_ms": summary([b - d for b, d in zip(b_p99, d_p99, strict=True)]),
            "p99_ratio": summary(ratios(b_p99, d_p99)),
            "p50_added_ms": summary([b - d for b, d in zip(b_p50, d_p50, strict=True)]),
            "balancer_cpu_us_per_call": summary(lb_cpu),
            "backend_cpu_us_per_call": summary(backend_cpu),
            "backend_direct_cpu_us_per_call": summary(direct_cpu),
            "balancer_vs_backend_cpu_per_call": summary(ratios(lb_cpu, backend_cpu)),
            "backend_cpu_per_call_behind_vs_direct": summary(ratios(backend_cpu, direct_cpu)),
            "balancer_vs_direct_backend_cpu_per_call": summary(ratios(lb_cpu, direct_cpu)),
            "balancer_cpu_share": summary(series("balancer", "balancer_cpu_share")),
            "driver_cpu_share_through": summary(series("balancer", "driver_cpu_share")),
            "backend_cpu_share_through": summary(series("balancer", "server_cpu_share")),
            "backend_connections_opened": summary(series("balancer", "backend_connections_opened")),
        }
    return {
        "levels": levels,
        "balancer_processes": rounds[0]["balancer_processes"],
        "disturbed_retries": sum(
            r[path][level]["disturbed_retries"]
            for r in rounds
            for path in PATHS
            for level in cfg.levels
        ),
        "loadavg_1m": summary([r["loadavg_1m_before"] for r in rounds]),
    }


def targets(s: dict, cfg: Config) -> list[Target]:
    """Issue 12's targets, each against the median over the rounds of a per-round figure."""
    found = []
    if 50 in cfg.levels:
        found.append(
            Target("balancer adds to p99 at 50 in flight (h2load)",
                   s["levels"][50]["p99_added_ms"]["median"], "<=", 1.0, " ms")
        )  # fmt: skip
    found += [
        Target(f"balancer CPU per call vs a backend's at {level} in flight",
               s["levels"][level]["balancer_vs_backend_cpu_per_call"]["median"], "<=", 0.25, "x")
        for level in cfg.levels
    ]  # fmt: skip
    return found


def table(s: dict, cfg: Config) -> str:
    """The Markdown table for stdout and the README."""
    rows = []
    for level in cfg.levels:
        conns, streams = LEVELS[level]
        e = s["levels"][level]
        rows.append([
            f"{level} ({conns}x{streams})",
            f"{e['direct_calls_per_s']['median']:,.0f}",
            fmt_range(e["calls_ratio"]),
            f"{e['direct_p99_ms']['median']:.1f}",
            f"{e['balancer_p99_ms']['median']:.1f}",
            fmt_range(e["p99_added_ms"], 1, " ms"),
            f"{e['balancer_cpu_us_per_call']['median']:.0f} µs",
            f"{e['backend_cpu_us_per_call']['median']:.0f} µs",
            fmt_range(e["balancer_vs_backend_cpu_per_call"]),
        ])  # fmt: skip
    text = markdown_table(
        ["in flight (conns x streams)", "direct calls/s", "through the balancer calls/s",
         "direct p99 ms", "through p99 ms", "p99 added", "HAProxy CPU per call",
         "backend CPU per call", "HAProxy / backend CPU per call"],
        rows,
    )  # fmt: skip
    text += (
        "\n\nThe balancer (HAProxy, the greeter_lb role's configuration on loopback) fronts "
        "the same one backend the direct calls reach, so each pair isolates the hop; backend "
        "on CPU 0, HAProxy and h2load on CPU 1. Ratios and added milliseconds: medians of the "
        f"per-round figures (min-max over {cfg.rounds} interleaved rounds of {cfg.duration:g} "
        "s). HAProxy's and the backend's CPU per call: over the same calls through the balancer."
    )
    extra = []
    for level in cfg.levels:
        e = s["levels"][level]
        extra.append(
            f"- {level} in flight through the balancer: CPU 1 used by HAProxy "
            f"{e['balancer_cpu_share']['median']:.2f} and h2load "
            f"{e['driver_cpu_share_through']['median']:.2f} of a core, the backend "
            f"{e['backend_cpu_share_through']['median']:.2f} of CPU 0; the backend's CPU per "
            "call behind the balancer vs direct "
            f"{fmt_range(e['backend_cpu_per_call_behind_vs_direct'])}, HAProxy's against the "
            f"backend's direct {fmt_range(e['balancer_vs_direct_backend_cpu_per_call'])}"
            f"; p50 added {fmt_range(e['p50_added_ms'], 2, ' ms')}; new connections HAProxy "
            f"opened to the backend during the measurement (it keeps the warm-up's) "
            f"{fmt_range(e['backend_connections_opened'], 0, '')} (h2load opened "
            f"{LEVELS[level][0]} to it)"
        )
    extra.append(
        f"- HAProxy {s['balancer_processes']} processes (master and worker, one thread: pinned to "
        f"CPU 1); load average before the rounds {fmt_range(s['loadavg_1m'], 1, '')}; "
        f"measurements repeated because another process took the backend's CPU: "
        f"{s['disturbed_retries']}"
    )
    return text + "\n\n" + "\n".join(extra)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="bench/run balancer", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--levels", default="50,500", help="calls in flight (default: 50,500)")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    if args.rounds < 1 or args.duration <= 0 or not set(levels) <= set(LEVELS):
        parser.error(f"need --rounds >= 1, --duration > 0, levels among {sorted(LEVELS)}")
    return Config(rounds=args.rounds, duration=args.duration, levels=levels)


def run(cfg: Config) -> tuple[str, list[Target]]:
    """Measure, store the JSON section, and return the table and the checked targets."""
    haproxy_binary()
    for tool in ("h2load", "nghttp", "taskset"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is missing: run `make host-deps` (Debian nghttp2-client)")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 CPUs: the backend on CPU 0, HAProxy and the load on CPU 1")
    if os.geteuid() != 0:
        raise BenchError(
            "runs HAProxy as the role configures it (chroot /var/lib/haproxy, workers as user "
            "haproxy), which needs root"
        )
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    rounds = []
    for i in range(cfg.rounds):
        first = PATHS[i % 2]
        print(f"balancer: round {i + 1}/{cfg.rounds} ({first} first)", file=sys.stderr, flush=True)
        rounds.append(measure_round(cfg, first))
    s = summarise(rounds, cfg)
    checked = targets(s, cfg)
    write_results(
        "balancer",
        {
            "machine": machine,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()},
            "levels_connections_streams": LEVELS,
            "summary": s,
            "rounds": rounds,
            "targets": [t.as_dict() for t in checked],
        },
    )
    text = f"## Balancer ({machine_line(machine)})\n\n{table(s, cfg)}"
    return text, checked
