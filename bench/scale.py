"""Scale benchmark on the lab: how a deploy's cost grows with the fleet (issue 23).

At each fleet size (5, 10, 25 and 50 hosts by default), on fresh lab hosts with the balancer
host in front of them, with the project's ``ansible.cfg``:

- first deploy: ``site.yml`` on hosts just booted (stack, balancer, rollout, alarms, probe);
- no-op rerun: ``playbooks/deploy.yml`` again; it must change nothing;
- config-only upgrade: ``playbooks/deploy.yml -e greeter_log_level=debug`` (a new release of the
  same commit), while a plain client (ONE channel to the front door, retries off,
  tests/frontdoor/plain_client.py) calls SayHello throughout; its calls are counted, the lost
  ones too;
- rollback: ``playbooks/rollback.yml`` (to the previous release), the same client calling.

Each row gives a time and its ratio to the smallest fleet's row, and the machine's 1-minute load
average before the run (the machine is shared). One size at a time: a size's lab is taken down
before the next comes up. Where the time goes is in each run's log (profile_tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    REPO,
    RESULTS,
    BenchError,
    Target,
    machine_info,
    machine_line,
    markdown_table,
    run_watched,
    write_results,
)
from bench.deploy import DEPLOY, SITE, Lab, parse_recap, task_seconds

BIN = Path(sys.executable).parent
PLAIN_CLIENT = REPO / "tests" / "frontdoor" / "plain_client.py"
ROLLBACK = "playbooks/rollback.yml"
BALANCER = "greeter-lb"  # the lab's stand-in for the stack's balancer instance
SIZES = (5, 10, 25, 50)
STEPS = ("first", "noop", "upgrade", "rollback")
STEP_LABELS = {
    "first": "first deploy (site.yml)",
    "noop": "no-op rerun (deploy.yml)",
    "upgrade": "config-only upgrade",
    "rollback": "rollback",
}
CLIENT_THREADS = 8  # calls in flight on the plain client's one channel


@dataclass
class Config:
    sizes: tuple[int, ...] = SIZES
    lab_name: str = "scale"
    keep_lab: bool = False
    log_dir: Path = RESULTS / "logs"
    project_env: tuple[tuple[str, str], ...] = ()  # to try a setting (e.g. ANSIBLE_FORKS=50)


@dataclass
class Step:
    seconds: float
    load: float  # 1-minute load average before the step
    changed: int
    calls_ok: int | None = None  # the plain client's, during an upgrade or a rollback
    calls_lost: int | None = None
    slowest_tasks: list[tuple[str, float]] = field(default_factory=list)
    log: str = ""


class PlainClient:
    """The tests' plain client (one channel, retries off) calling the front door until stopped."""

    def __init__(self, target: str, env: dict[str, str]) -> None:
        argv = [sys.executable, str(PLAIN_CLIENT), target, str(CLIENT_THREADS)]
        self.process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        if self.process.returncode != 0:
            raise BenchError(f"the plain client failed: {err[-1000:]}")
        return json.loads(out)


def play(lab: Lab, cfg: Config, work: Path, size: int, step: str, *argv: str) -> Step:
    """One ansible-playbook run in the lab's environment, with a fresh SSH control folder."""
    control = Path(tempfile.mkdtemp(prefix="cp-", dir=work))
    env = {
        **os.environ,
        **lab.env,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
        "ANSIBLE_NOCOLOR": "1",
        **dict(cfg.project_env),
    }
    load = os.getloadavg()[0]
    started = time.monotonic()
    done = run_watched([str(BIN / "ansible-playbook"), *argv], 3600, cwd=REPO, env=env)
    seconds = time.monotonic() - started
    log = cfg.log_dir / f"scale-{size:02d}-{step}.log"
    log.write_text(done.stdout + done.stderr)
    hosts = lab.addresses()
    recap = {h: c for h, c in parse_recap(done.stdout).items() if h in hosts}
    if done.returncode != 0 or any(c["failed"] or c["unreachable"] for c in recap.values()):
        raise BenchError(f"{size} hosts, {step}: ansible-playbook failed; see {log}")
    # Every backend ran (the balancer host only in the plays that target it).
    if missing := sorted(set(hosts) - {BALANCER} - set(recap)):
        raise BenchError(f"{size} hosts, {step}: {missing} not in the recap; see {log}")
    changed = sum(c["changed"] for c in recap.values())
    slowest = sorted(task_seconds(done.stdout), key=lambda t: -t[1])[:3]
    print(
        f"scale: {size} hosts, {step}: {seconds:.1f} s, changed={changed}, load {load:.1f}",
        file=sys.stderr,
        flush=True,
    )
    return Step(round(seconds, 1), round(load, 2), changed, slowest_tasks=slowest, log=str(log))


def through_the_front_door(lab: Lab, run: callable) -> Step:
    """`run()` while the plain client calls the front door; its calls counted into the step."""
    front = f"{lab.addresses()[BALANCER]}:50051"
    client = PlainClient(front, {**os.environ, **lab.env})
    try:
        time.sleep(1)  # calls flowing before the first host leaves
        step = run()
    finally:
        report = client.stop()
    step.calls_ok, step.calls_lost = report["ok"], len(report["failures"])
    return step


def one_size(lab: Lab, cfg: Config, work: Path, size: int) -> dict[str, Step]:
    lab.up(size, balancer=True)
    steps = {"first": play(lab, cfg, work, size, "first", SITE)}
    steps["noop"] = play(lab, cfg, work, size, "noop", DEPLOY)
    if steps["noop"].changed:
        raise BenchError(f"{size} hosts: the no-op rerun changed {steps['noop'].changed} tasks")
    steps["upgrade"] = through_the_front_door(
        lab, lambda: play(lab, cfg, work, size, "upgrade", DEPLOY, "-e", "greeter_log_level=debug")
    )
    steps["rollback"] = through_the_front_door(
        lab, lambda: play(lab, cfg, work, size, "rollback", ROLLBACK)
    )
    return steps


def run_all(cfg: Config) -> tuple[dict[int, dict[str, Step]], list[str]]:
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    lab = Lab(cfg.lab_name)
    results: dict[int, dict[str, Step]] = {}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        try:
            for size in cfg.sizes:
                try:
                    results[size] = one_size(lab, cfg, Path(tmp), size)
                except BenchError as err:
                    errors.append(f"{size} hosts: {err}")
                    print(f"scale: {size} hosts failed: {err}", file=sys.stderr, flush=True)
        finally:
            if not cfg.keep_lab:
                lab.down()
    return results, errors


def table(results: dict[int, dict[str, Step]]) -> str:
    """One row per step and fleet size: seconds, the ratio to the smallest size, the load."""
    if not results:
        return "(nothing measured)"
    base = results[min(results)]
    rows = []
    for step in STEPS:
        for size, steps in sorted(results.items()):
            s = steps[step]
            calls = "" if s.calls_ok is None else f"{s.calls_ok} ok, {s.calls_lost} lost"
            rows.append(
                [
                    STEP_LABELS[step],
                    str(size),
                    f"{s.seconds:.1f}",
                    f"{s.seconds / base[step].seconds:.2f}x",
                    str(s.changed),
                    calls,
                    f"{s.load:.1f}",
                ]
            )
    headers = ["step", "hosts", "seconds", f"vs {min(results)} hosts", "changed", "plain client"]
    return markdown_table([*headers, "load (1 min)"], rows)


def targets(results: dict[int, dict[str, Step]]) -> list[Target]:
    """Issue 23's targets; a figure that was not measured is a miss."""
    small, large = results.get(min(SIZES)), results.get(max(SIZES))
    noop = large["noop"].seconds if large else None
    ratio = noop / small["noop"].seconds if large and small else None
    lost = (large["upgrade"].calls_lost or 0) if large else None
    first = large["first"].seconds if large else None
    return [
        Target("no-op rerun of 50 hosts", noop, "<=", 15, " s"),
        Target("no-op rerun of 50 hosts vs 5 hosts", ratio, "<=", 3.0, "x"),
        Target("calls lost in the upgrade of 50 hosts", lost, "<=", 0),
        Target("first deploy of 50 hosts", first, "<=", 600, " s"),
    ]


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="bench/run scale", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="fleet sizes (default: 5,10,25,50)"
    )
    parser.add_argument("--lab-name", default="scale", help="LAB_NAME of the lab (default: scale)")
    parser.add_argument("--keep-lab", action="store_true", help="leave the last lab up")
    parser.add_argument(
        "--project-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for every run, to try a setting (e.g. ANSIBLE_FORKS=50)",
    )
    args = parser.parse_args(argv)
    try:
        sizes = tuple(sorted(int(s) for s in args.sizes.split(",") if s))
    except ValueError:
        parser.error(f"--sizes takes numbers separated by commas, not {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes needs at least one size of 1 or more")
    if any("=" not in item for item in args.project_env):
        parser.error("--project-env takes KEY=VALUE")
    project_env = tuple(tuple(item.split("=", 1)) for item in args.project_env)
    return Config(sizes, args.lab_name, args.keep_lab, project_env=project_env)


def run(cfg: Config) -> tuple[str, list[Target]]:
    if os.geteuid() != 0:
        raise BenchError("the lab needs root (network namespaces, systemd-nspawn)")
    machine = machine_info()
    results, errors = run_all(cfg)
    checked = targets(results)
    write_results(
        "scale",
        {
            "machine": machine,
            "config": {"sizes": list(cfg.sizes), "project_env": dict(cfg.project_env)},
            "runs": {
                str(size): {step: vars(s) for step, s in steps.items()}
                for size, steps in results.items()
            },
            "errors": errors,
            "targets": [t.as_dict() for t in checked],
        },
    )
    text = f"## Scale ({machine_line(machine)})\n\n{table(results)}"
    if errors:
        text += "\n\nFailed:\n" + "\n".join(f"- {e}" for e in errors)
    return text, checked
