"""What both benchmarks share: summaries over rounds, targets, Markdown tables, the results file.

Machines here are shared and noisy, so a figure is never reported alone: each round measures the
baseline and the candidate back to back, and the ratio of the pair is what gets summarised.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# BENCH_RESULTS moves the output (the harness's own tests use it to keep the real results).
RESULTS = Path(os.environ.get("BENCH_RESULTS", REPO / "bench" / "results"))
LATEST = RESULTS / "latest.json"


class BenchError(RuntimeError):
    """A measurement that cannot be trusted: the run stops instead of reporting it."""


def _load_watchdog():
    """lab/watchdog.py, the outer watchdog the demo and the tests use too (one mechanism)."""
    spec = importlib.util.spec_from_file_location("lab_watchdog", REPO / "lab" / "watchdog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


watchdog = _load_watchdog()


def run_watched(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """A command of the benchmark under the watchdog: past `timeout` it is stopped with all it
    started, and the run fails saying where it was stuck instead of hanging."""
    try:
        return watchdog.run(argv, timeout, **kwargs)
    except watchdog.Stuck as stuck:
        raise BenchError(stuck.report) from None


def summary(values: list[float]) -> dict[str, float | list[float]]:
    """Median and range of one figure over the rounds (the median resists a noisy neighbour)."""
    if not values:
        raise ValueError("no values to summarise")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def ratios(candidate: list[float], baseline: list[float]) -> list[float]:
    """Per-round ratios: round i of the candidate against round i of the baseline."""
    if len(candidate) != len(baseline):
        raise ValueError(f"{len(candidate)} candidate rounds against {len(baseline)} baseline")
    return [c / b if b else float("inf") for c, b in zip(candidate, baseline, strict=True)]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (how ghz and h2load users read p99)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, round(fraction * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def fmt_range(s: dict, digits: int = 2, suffix: str = "x") -> str:
    """``1.05x (0.98-1.10)``: a median with its min-max over the rounds."""
    return f"{s['median']:.{digits}f}{suffix} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table, the form the README carries."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Target:
    """One target from issue 6, checked against a measured figure.

    ``op`` is ``>=`` or ``<=``; a target whose figure could not be measured is missed, never
    silently passed.
    """

    name: str
    value: float | None
    op: str
    limit: float
    unit: str = ""

    @property
    def ok(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def line(self) -> str:
        shown = "not measured" if self.value is None else f"{self.value:.2f}{self.unit}"
        verdict = "ok  " if self.ok else "MISS"
        return f"{verdict} {self.name}: {shown} (target {self.op} {self.limit:g}{self.unit})"

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _command_output(*argv: str) -> str:
    if not shutil.which(argv[0]):
        return "missing"
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def machine_info() -> dict[str, str | int | float]:
    """The machine line of the README table: what the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    load1, load5, _ = os.getloadavg()
    return {
        "nproc": os.cpu_count() or 0,
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "grpcio": metadata.version("grpcio"),
        "ansible_core": _package_version("ansible-core"),
        "h2load": _command_output("h2load", "--version"),
        "loadavg_1m_at_start": round(load1, 2),
        "loadavg_5m_at_start": round(load5, 2),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine_line(info: dict) -> str:
    """One line that lets a reader compare their machine with ours."""
    return (
        f"{info['nproc']} x {info['cpu_model']}, {info['os']}, kernel {info['kernel']}, "
        f"Python {info['python']}, grpcio {info['grpcio']}, ansible-core {info['ansible_core']}, "
        f"{info['h2load']}; load average {info['loadavg_1m_at_start']} at start, {info['date_utc']}"
    )


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        return "Linux"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def write_results(section: str, data: dict, path: Path = LATEST) -> Path:
    """Store one benchmark's section in the results file, keeping the other's from the same day.

    Writes to a temporary file and renames it, so an interrupted run never leaves half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        current = {}
    current[section] = data
    current["machine"] = data.get("machine", current.get("machine"))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
