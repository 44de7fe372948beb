"""What the front-door suites share (tests/frontdoor/test_frontdoor*.py): the lab's balancer
seen from its runtime API, a plain client and h2load through it, HAProxy's own counters."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from support.lab import LabSession

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.service import REQUEST, BenchError, parse_h2load  # noqa: E402

PLAIN_CLIENT = Path(__file__).with_name("plain_client.py")
IN_FLIGHT = 24  # calls the plain client keeps in flight on its one channel
# Its steady rate while a deploy runs: enough calls in every second of a restart to see one
# fail; flat out, the client and the servers it kept busy took the cores the deploy needs.
RATE = 400
BACKENDS = ["greeter-1", "greeter-2", "greeter-3"]

# Runs on the balancer host: the wall-clock time a server leaves UP at the balancer.
LEAVES_ROTATION = """
import csv, io, socket, sys, time
def state():
    s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock')
    s.sendall(b'show stat\\n'); text = s.makefile().read().lstrip('# ')
    return {r['svname']: r['status'] for r in csv.DictReader(io.StringIO(text))}
print('watching', flush=True)
deadline = time.time() + 60
while time.time() < deadline:
    if not state()[sys.argv[1]].startswith('UP'):
        print(time.time(), flush=True); break
    time.sleep(0.05)
"""


# --- helpers -------------------------------------------------------------------------------------


def front(lab: LabSession) -> str:
    assert lab.balancer is not None, "lab/lab up --balancer gives the lab a balancer host"
    return f"{lab.balancer.address}:50051"


def at_balancer(lab: LabSession) -> dict[str, dict]:
    """Every backend's state and counters at the balancer, read on the balancer host."""
    code = (
        "import csv, io, json, socket; s = socket.socket(socket.AF_UNIX); "
        "s.connect('/run/haproxy/admin.sock'); s.sendall(b'show stat\\n'); "
        "rows = csv.DictReader(io.StringIO(s.makefile().read().lstrip('# '))); "
        "print(json.dumps({r['svname']: r for r in rows if r['pxname'] == 'greeter' "
        "and r['svname'] != 'BACKEND'}))"
    )
    out = lab.ssh(lab.balancer.name, f"sudo python3 -c {shlex.quote(code)}").stdout
    return json.loads(out)


def wait_all_up(lab: LabSession, names: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {n: s["status"] for n, s in at_balancer(lab).items()}
        if sorted(states) == names and all(v.startswith("UP") for v in states.values()):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.5)


class PlainClient:
    """tests/frontdoor/plain_client.py in the background until the block ends."""

    def __init__(self, lab: LabSession) -> None:
        self.argv = [sys.executable, str(PLAIN_CLIENT), front(lab), str(IN_FLIGHT), "--rate"]
        self.argv.append(str(RATE))
        self.env = lab.env
        self.report: dict = {}

    def __enter__(self) -> PlainClient:
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err
        self.report = json.loads(out)

    @property
    def failures(self) -> list[list]:
        return self.report["failures"]


# Runs on the balancer host: every backend's status, sessions since start (stot) and current
# sessions (scur) from HAProxy's `show stat`, as a JSON line [CLOCK_MONOTONIC s, {server: [status,
# stot, scur]}] each time one changes, sampled every 50 ms, until its stdin closes. Lab hosts
# share the machine's kernel, so its clock is the one systemd's *TimestampMonotonic use on hosts.
COUNTERS = """
import csv, io, json, select, socket, sys, time
def read():
    s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock')
    s.sendall(b'show stat\\n'); text = s.makefile().read().lstrip('# ')
    return {r['svname']: [r['status'], int(r['stot'] or 0), int(r['scur'] or 0)]
            for r in csv.DictReader(io.StringIO(text))
            if r['pxname'] == 'greeter' and r['svname'] != 'BACKEND'}
print('watching', flush=True)
last = None
while not select.select([sys.stdin], [], [], 0.05)[0] or sys.stdin.read(1):
    now = read()
    if now != last:
        print(json.dumps([time.monotonic(), now]), flush=True); last = now
"""


class Counters:
    """HAProxy's own per-backend counters, sampled on the balancer host while the block runs."""

    def __init__(self, lab: LabSession) -> None:
        self.argv = [str(REPO / "lab" / "lab"), "ssh", lab.balancer.name,
                     f"sudo python3 -c {shlex.quote(COUNTERS)}"]  # fmt: skip
        self.env = lab.env
        self.samples: list[tuple[float, dict[str, list]]] = []

    def __enter__(self) -> Counters:
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "watching"
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.process.communicate(timeout=30)  # closes its stdin: the sampler ends
        self.samples = [tuple(json.loads(line)) for line in out.splitlines()]

    def most_out_at_once(self) -> int:
        """The most backends out of rotation (not UP at the balancer) in any one sample."""
        return max(
            sum(not row[0].startswith("UP") for row in servers.values())
            for _, servers in self.samples
        )


def restart_window(lab: LabSession, name: str) -> tuple[float, float]:
    """When the host's last service restart began (the running server was told to stop) and when
    the new server was ready (systemd's active state), in CLOCK_MONOTONIC seconds."""
    props = "-p ActiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic"
    out = lab.ssh(name, f"systemctl show greeter.service {props}").stdout
    values = dict(line.split("=", 1) for line in out.split())
    began, ready = (int(values[key]) / 1e6 for key in (
        "ActiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic"))  # fmt: skip
    assert 0 < began < ready, out
    return began, ready


def drained_through_restart(lab: LabSession, counters: Counters, name: str) -> str:
    """Assert, by HAProxy's own counters, that the balancer sent `name` no new call from before
    its last restart until the restarted server was ready, while it kept sending the others
    calls (the client ran), and that no call was left on it when the restart began."""
    began, ready = restart_window(lab, name)
    samples = counters.samples
    assert samples[0][0] < began and samples[-1][0] > ready, (samples[0][0], began, ready)
    before = [servers for t, servers in samples if t <= began][-1]
    after = next(servers for t, servers in samples if t >= ready)
    during = [servers[name][0] for t, servers in samples if began <= t <= ready]
    where = f"{name}: restart {began:.2f}..{ready:.2f}, {before[name]} -> {after[name]}"
    assert not before[name][0].startswith("UP"), f"not drained before its restart: {where}"
    assert before[name][2] == 0, f"calls left on it when its restart began: {where}"
    assert not any(status.startswith("UP") for status in during), (where, during)
    assert after[name][1] == before[name][1], f"new calls during its restart: {where}"
    others = sum(after[n][1] - before[n][1] for n in after if n != name)
    assert others > 0, f"no call reached the other backends meanwhile: {where}"
    return f"{name}: 0 new calls in {ready - began:.1f} s of restart ({others} to the others)"


class H2load:
    """h2load (1 connection, 20 streams, RATE/2 calls/s) at the front door in back-to-back 4 s runs.

    Each run must pass bench's check: no call failed, and every counted call carried one
    response message (a gRPC error is an HTTP 200 without one), i.e. grpc-status 0.
    """

    def __init__(self, lab: LabSession, tmp: Path) -> None:
        self.url = f"http://{front(lab)}/hello.Greeter/SayHello"
        self.body, self.log = tmp / "request.grpc", tmp / "h2load.tsv"
        self.body.write_bytes(REQUEST)
        self.runs: list[dict] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.log.unlink(missing_ok=True)
            done = subprocess.run(
                ["h2load", "-D", "4s", "-c", "1", "-m", "20", f"--rps={RATE // 2}",
                 "-H", "content-type: application/grpc", "-H", "te: trailers",
                 "-d", str(self.body), f"--log-file={self.log}", self.url],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            try:
                lines = self.log.read_text().splitlines() if self.log.exists() else []
                self.runs.append(parse_h2load(done.stdout, lines, 4.0))
            except BenchError as error:
                self.problems.append(str(error))

    def __enter__(self) -> H2load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    @property
    def calls(self) -> int:
        return sum(run["calls"] for run in self.runs)


def probe_rows(lab: LabSession) -> tuple[int, list[dict]]:
    targets = [f"{host.address}:50051" for host in lab.hosts]
    result = lab.run("greeter", "probe", *targets, "--balancer", front(lab), "--json", check=False)
    return result.returncode, json.loads(result.stdout or "[]")


def leaves_rotation(lab: LabSession, name: str) -> subprocess.Popen:
    """Start watching `name` at the balancer; returns once the watcher runs."""
    watcher = subprocess.Popen(
        [str(REPO / "lab" / "lab"), "ssh", lab.balancer.name,
         f"sudo python3 -c {shlex.quote(LEAVES_ROTATION)} {name}"],
        env=lab.env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert watcher.stdout.readline().strip() == "watching"
    return watcher


def out_at(watcher: subprocess.Popen) -> float:
    out, _ = watcher.communicate(timeout=90)
    assert out.strip(), "the backend never left rotation"
    return float(out.split()[-1])


def set_at_balancer(lab: LabSession, name: str, state: str) -> None:
    """`set server greeter/<name> state <state>` on the balancer's runtime API, by hand."""
    code = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); "
        "s.connect('/run/haproxy/admin.sock'); "
        "s.sendall(('set server greeter/%s state %s\\n' % tuple(sys.argv[1:])).encode()); "
        "print(s.makefile().read().strip())"
    )
    said = lab.ssh(lab.balancer.name, f"sudo python3 -c {shlex.quote(code)} {name} {state}")
    assert said.stdout.strip() == "", said.stdout
