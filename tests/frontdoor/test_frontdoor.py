"""The front door on lab hosts: one balancer (HAProxy, roles/greeter_lb) in front of the fleet.

One lab (3 backends + the balancer host, LAB_NAME ``front``) shared by every test in file
order: the first site.yml builds the whole front door, the last ones take a host out of the
stack, add it back, and rerun with nothing to change. Clients here are plain: ONE channel to
the balancer, retries disabled (tests/frontdoor/plain_client.py), and h2load as an independent
HTTP/2 client.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.ansible import recap, with_ssh_options

if TYPE_CHECKING:
    from support.lab import LabSession

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.service import REQUEST, BenchError, parse_h2load  # noqa: E402

LAB_NAME = os.environ.get("LAB_FRONTDOOR_NAME", "front")
PLAIN_CLIENT = Path(__file__).with_name("plain_client.py")
IN_FLIGHT = 24  # calls the plain client keeps in flight on its one channel
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
        self.argv = [sys.executable, str(PLAIN_CLIENT), front(lab), str(IN_FLIGHT)]
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


# --- the shared fleet ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(extra_lab: Callable[..., LabSession]) -> Iterator[LabSession]:
    """Three lab backends and the balancer host."""
    yield extra_lab(LAB_NAME, 3, balancer=True)


# --- the tests, in order -------------------------------------------------------------------------


def test_site_puts_a_front_door_before_the_fleet(fleet: LabSession) -> None:
    result = fleet.playbook("site.yml")
    table = result.stdout
    shown = table[table.index("TASK [Show the table]") :].split("\nTASK [")[0]
    print(f"\n[frontdoor] the first site.yml's probe table:\n{shown}", flush=True)
    # The probe's table: the front door first, each host UP at the balancer.
    assert re.search(rf"{re.escape(front(fleet))}\s+yes\s+SERVING.*front-door", table), table
    for host in fleet.hosts:
        assert re.search(rf"{re.escape(host.address)}:50051\s+yes\s+SERVING.*\sUP", table), table
    assert sorted(at_balancer(fleet)) == BACKENDS
    # The stack's balancer instance, alone in its group, at the lab's balancer host.
    graph = fleet.run("ansible-inventory", "--graph", "greeter_lb").stdout
    assert [line.strip(" |-") for line in graph.splitlines()[1:]] == [fleet.balancer.name]
    hello = fleet.run("greeter", "hello", fleet.balancer.address, "Teste")
    assert hello.stdout.strip() == "Olá, Teste!"


def test_one_channel_spreads_calls_over_every_backend(fleet: LabSession) -> None:
    done = fleet.run(sys.executable, str(PLAIN_CLIENT), front(fleet), "24", "--calls", "3000")
    report = json.loads(done.stdout)
    assert report["failures"] == [] and report["ok"] == 3000, report
    shares = {host: n / 3000 for host, n in report["answered"].items()}
    print(f"\n[frontdoor] share of 3000 calls on one channel: {shares}", flush=True)
    assert sorted(shares) == BACKENDS
    assert all(0.25 <= share <= 0.42 for share in shares.values()), shares


def test_a_rolling_upgrade_fails_no_call_of_a_plain_client_or_h2load(
    fleet: LabSession, tmp_path: Path
) -> None:
    new = fleet.push_commit(tmp_path, "front door upgrade")
    with (
        Counters(fleet) as counters,
        PlainClient(fleet) as plain,
        H2load(fleet, tmp_path) as h2load,
    ):
        time.sleep(2)
        started = time.monotonic()
        result = fleet.playbook(
            "playbooks/deploy.yml", "-e", f"greeter_version={new}", "-e", '{"greeter_serial": [1]}'
        )
        upgraded = time.monotonic() - started
        time.sleep(2)
    print(f"\n[frontdoor timing] rolling upgrade of 3 hosts: {upgraded:.1f} s", flush=True)
    ended = recap(result.stdout)
    for name in BACKENDS:
        assert ended[name]["failed"] == 0
        # Drained at the balancer and put back, by HAProxy's own counters: no new call from
        # before its restart until its new server was ready.
        print(f"[frontdoor] {drained_through_restart(fleet, counters, name)}", flush=True)
    assert counters.most_out_at_once() == 1  # batches of one
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed", flush=True)
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 500
    print(f"[frontdoor] h2load: {h2load.calls} calls in {len(h2load.runs)} runs", flush=True)
    assert h2load.problems == [], h2load.problems
    assert h2load.calls > 500
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    assert {row["commit"] for row in rows} == {new}


# Runs on the balancer host: each change of a server's status at the balancer ("time status"),
# sampled every 50 ms, until its stdin closes.
STATUS_TIMELINE = """
import csv, io, select, socket, sys, time
def status():
    s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock')
    s.sendall(b'show stat\\n'); text = s.makefile().read().lstrip('# ')
    return {r['svname']: r['status'] for r in csv.DictReader(io.StringIO(text))}[sys.argv[1]]
print('watching', flush=True)
last = None
while not select.select([sys.stdin], [], [], 0.05)[0] or sys.stdin.read(1):
    now = status()
    if now != last:
        print(time.time(), now, flush=True); last = now
"""


def test_a_host_failing_its_gate_stays_out_of_rotation_until_its_rollback_serves(
    fleet: LabSession, tmp_path: Path
) -> None:
    """A release that passes the balancer's health check but not the gate (a wrong greeting): the
    plain client never gets an answer from it, and the host returns to rotation once, after its
    rollback serves again."""
    wait_all_up(fleet, BACKENDS)
    good = {row["commit"] for row in probe_rows(fleet)[1]}
    assert len(good) == 1, good

    def wrong_greeting(clone: Path) -> None:
        server = clone / "service" / "src" / "greeter" / "server.py"
        text = server.read_text()
        assert 'f"Olá, {nome}!"' in text
        server.write_text(text.replace('f"Olá, {nome}!"', 'f"Oi, {nome}!"'))

    bad = fleet.push_commit(tmp_path, "A release with another greeting", wrong_greeting)
    watcher = subprocess.Popen(
        [str(REPO / "lab" / "lab"), "ssh", fleet.balancer.name,
         f"sudo python3 -c {shlex.quote(STATUS_TIMELINE)} greeter-1"],
        env=fleet.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert watcher.stdout.readline().strip() == "watching"
        with PlainClient(fleet) as plain:
            time.sleep(2)
            result = fleet.playbook(
                "playbooks/deploy.yml", "-e", f"greeter_version={bad}",
                "-e", "greeter_verify_timeout=5", check=False,
            )  # fmt: skip
            time.sleep(2)
    finally:
        out, _ = watcher.communicate(timeout=30)  # closes its stdin: the watcher ends
    timeline = [line.split(maxsplit=1)[1] for line in out.splitlines()]
    output = " ".join((result.stdout + result.stderr).split())
    print(f"\n[frontdoor] greeter-1 at the balancer: {' -> '.join(timeline)}", flush=True)
    assert result.returncode != 0
    assert re.search(rf"greeter-1: release {bad}-[0-9a-f]{{12}} failed \(", output), output[-3000:]
    assert "which serves again" in output, output[-3000:]
    # Out of rotation from the drain to the end of its rollback: UP once before, once after.
    up = [state.startswith("UP") for state in timeline]  # "UP", "UP 1/3" (going down), ...
    assert up[0] and up[-1], timeline
    assert sum(1 for before, now in itertools.pairwise(up) if now and not before) == 1, timeline
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed", flush=True)
    assert plain.failures == [], plain.failures[:10]  # no error and no "Oi" reached it
    assert plain.report["ok"] > 200
    assert {row["commit"] for row in probe_rows(fleet)[1]} == good


STARTS_EXCEPT_ON_GREETER_3 = """


_every_host_main = main


def main(argv=None):  # a release that does not start on greeter-3
    import socket

    if socket.gethostname() == "greeter-3":
        raise SystemExit("this release does not start on greeter-3")
    return _every_host_main(argv)
"""


def test_a_rollout_whose_last_batch_fails_goes_back_batch_by_batch_through_the_front_door(
    fleet: LabSession, tmp_path: Path
) -> None:
    """Batches of one; greeter-3, the last, fails its gate and goes back itself; the run then puts
    greeter-1 and greeter-2 back one at a time, each drained at the balancer before its restart
    and readied after its gate: a plain client through the front door loses no call, and HAProxy's
    counters show no new call reached a host while it restarted (issue 22)."""
    wait_all_up(fleet, BACKENDS)
    good = {row["commit"] for row in probe_rows(fleet)[1]}
    assert len(good) == 1, good

    def fails_on_greeter_3(clone: Path) -> None:
        server = clone / "service" / "src" / "greeter" / "server.py"
        server.write_text(server.read_text() + STARTS_EXCEPT_ON_GREETER_3)

    bad = fleet.push_commit(tmp_path, "A release that fails on greeter-3", fails_on_greeter_3)
    with Counters(fleet) as counters, PlainClient(fleet) as plain:
        time.sleep(2)
        started = time.monotonic()
        result = fleet.playbook(
            "playbooks/deploy.yml", "-e", f"greeter_version={bad}", "-e", '{"greeter_serial": [1]}',
            "-e", "greeter_verify_timeout=5", check=False,
        )  # fmt: skip
        took = time.monotonic() - started
        time.sleep(2)
    output = " ".join((result.stdout + result.stderr).split())
    print(f"\n[frontdoor timing] rollout, last batch failed, reverted: {took:.1f} s", flush=True)
    assert result.returncode != 0
    assert re.search(rf"greeter-3: release {bad}-[0-9a-f]{{12}} failed \(", output), output[-3000:]
    for name in ("greeter-1", "greeter-2"):
        assert re.search(
            rf"{name}: the run stopped after this host switched to {bad}-[0-9a-f]{{12}}; "
            r"reverted to [0-9a-f]{40}-[0-9a-f]{12}, which serves again",
            output,
        ), output[-3000:]
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed", flush=True)
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 200
    # Each host's last restart is its revert (greeter-3's, its own rollback): drained throughout.
    for name in BACKENDS:
        print(f"[frontdoor] {drained_through_restart(fleet, counters, name)}", flush=True)
    # The revert's batches are the rollout's: never two backends out of rotation at once, and
    # greeter-1 back and ready before greeter-2 leaves.
    assert counters.most_out_at_once() == 1
    assert restart_window(fleet, "greeter-1")[1] < restart_window(fleet, "greeter-2")[0]
    assert {row["commit"] for row in probe_rows(fleet)[1]} == good


def test_a_host_lost_after_it_switched_stops_the_run_and_the_others_go_back_through_the_front_door(
    fleet: LabSession, tmp_path: Path
) -> None:
    """greeter-1 switches and passes; its link goes down while greeter-2's batch runs. No later
    batch task touches greeter-1, yet the run must notice it, name it, and put greeter-2 and
    greeter-3 back, each drained at the balancer around its restart (issue 22)."""
    wait_all_up(fleet, BACKENDS)
    good = {row["commit"] for row in probe_rows(fleet)[1]}
    assert len(good) == 1, good
    new = fleet.push_commit(tmp_path, "An upgrade that loses greeter-1")
    link = fleet.hosts[0].veth
    env = with_ssh_options(fleet.env, "-o", "ServerAliveInterval=2")
    env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(tmp_path / "cp")  # fresh masters with that option
    args = ["ansible-playbook", "playbooks/deploy.yml", "-e", f"greeter_version={new}",
            "-e", '{"greeter_serial": [1]}']  # fmt: skip
    lines: list[str] = []
    switches, lost_at = 0, 0.0
    try:
        with Counters(fleet) as counters, PlainClient(fleet) as plain:
            time.sleep(2)
            started = time.monotonic()
            with subprocess.Popen(args, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) as play:  # fmt: skip
                assert play.stdout is not None
                for line in play.stdout:
                    lines.append(line)
                    if line.startswith("TASK [greeter : Switch current"):
                        switches += 1
                        if switches == 2:  # greeter-1's batch passed, greeter-2's begins
                            lost_at = time.time()
                            subprocess.run(["ip", "link", "set", link, "down"], check=True)
                rc = play.wait(timeout=600)
            took = time.monotonic() - started
            time.sleep(2)
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    output = " ".join("".join(lines).split())
    print(
        f"\n[frontdoor timing] rollout losing a switched host, reverted: {took:.1f} s", flush=True
    )
    assert lost_at, output[-3000:]
    assert rc != 0
    assert recap("".join(lines))["greeter-1"]["unreachable"] == 1
    assert "greeter-1: lost during the rollout" in output, output[-3000:]
    for name in ("greeter-2", "greeter-3"):
        assert re.search(
            rf"{name}: the run stopped after this host switched to {new}-[0-9a-f]{{12}}; "
            r"reverted to [0-9a-f]{40}-[0-9a-f]{12}, which serves again",
            output,
        ), output[-3000:]
        print(f"[frontdoor] {drained_through_restart(fleet, counters, name)}", flush=True)
    # Only calls on their way to greeter-1 when its link went down can fail (a 5 s deadline, and
    # at most 3 s until the balancer takes it out); none during the reverts.
    late = [f for f in plain.failures if f[0] > lost_at + 3]
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed "
          f"(all within 3 s of the loss: {not late})", flush=True)  # fmt: skip
    assert late == [], late[:10]
    assert plain.report["ok"] > 200
    # The lost host kept the new release (nothing could put it back); the others serve the old.
    wait_all_up(fleet, BACKENDS, timeout=60)
    rows = {row["target"].split(":")[0]: row["commit"] for row in probe_rows(fleet)[1]}
    assert [rows[host.address] for host in fleet.hosts] == [new, *good, *good], rows
    # The rerun of the fleet's release puts greeter-1 back.
    fleet.playbook("playbooks/deploy.yml", "-e", f"greeter_version={next(iter(good))}")
    assert {row["commit"] for row in probe_rows(fleet)[1]} == good
    wait_all_up(fleet, BACKENDS)


class H2load:
    """h2load (1 connection, 20 streams) against the front door in back-to-back 4 s runs.

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
                ["h2load", "-D", "4s", "-c", "1", "-m", "20",
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


@pytest.mark.parametrize("fault", ["kill -9", "network cut"])
def test_a_dead_backend_leaves_rotation_within_3_s_and_later_calls_all_succeed(
    fleet: LabSession, fault: str
) -> None:
    wait_all_up(fleet, BACKENDS)
    victim = fleet.hosts[1] if fault == "kill -9" else fleet.hosts[2]
    with PlainClient(fleet) as plain:
        time.sleep(2)
        watcher = leaves_rotation(fleet, victim.name)
        if fault == "kill -9":
            # The time of the kill is read on the host (one clock for every lab host): the SSH
            # round trip to start the command is not the balancer's time.
            killed = fleet.ssh(
                victim, "date +%s.%N && sudo systemctl kill --signal=SIGKILL greeter.service"
            )
            faulted = float(killed.stdout.split()[0])
        else:
            faulted = time.time()
            subprocess.run(["ip", "link", "set", victim.veth, "down"], check=True)
        out = out_at(watcher)
        time.sleep(6)  # calls sent after it left: they must all succeed (5 s deadline each)
        if fault == "network cut":
            subprocess.run(["ip", "link", "set", victim.veth, "up"], check=True)
    took = out - faulted
    between = [f for f in plain.failures if f[0] < out]
    print(
        f"\n[frontdoor] {fault}: out of rotation after {took:.2f} s; "
        f"{len(between)} of {plain.report['ok'] + len(plain.failures)} calls failed in between "
        f"({sorted({f[2] for f in between})})",
        flush=True,
    )
    assert took <= 3.0
    after = [f for f in plain.failures if f[0] >= out]
    assert after == [], after[:10]
    assert plain.report["ok"] > 200
    wait_all_up(fleet, BACKENDS, timeout=60)  # systemd restarts it / the link is back


def test_a_host_removed_from_the_stack_leaves_the_balancer_and_one_added_joins_the_rotation(
    fleet: LabSession,
) -> None:
    # The stack shrinks to two instances: greeter-3's instance is terminated and the next run's
    # balancer configuration no longer lists it (the lab host itself keeps running).
    fleet.playbook("site.yml", "-e", "greeter_stack_instance_count=2")
    assert sorted(at_balancer(fleet)) == BACKENDS[:2]
    # Back to three: a new instance greeter-3 (mapped to the same lab host, whose release is still
    # in place, so its deploy finds it in the wanted state) becomes a backend and goes UP.
    fleet.playbook("site.yml")
    wait_all_up(fleet, BACKENDS)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ("greeter_lb_port=70000", "greeter_lb_port and greeter_lb_backend_port must be within"),
        ("greeter_tls_enabled=true", "greeter-1, greeter-2, greeter-3 serve(s) TLS only"),
    ],
)
def test_bad_input_stops_the_balancer_play_before_haproxy_changes(
    fleet: LabSession, extra: str, said: str
) -> None:
    """A wrong value, or backends that would serve TLS only (which the balancer's cleartext calls
    and checks cannot pass), fail the balancer's preflight: HAProxy's files stay as they were and
    the front door keeps answering."""
    files = "sudo sha1sum /etc/haproxy/haproxy.cfg /etc/systemd/system/haproxy.service.d/*"
    before = fleet.ssh(fleet.balancer.name, files).stdout
    result = fleet.playbook("playbooks/balancer.yml", "-e", extra, check=False)
    assert result.returncode == 2, result.stdout[-3000:]
    assert said in result.stdout and "Nothing was changed" in result.stdout, result.stdout[-3000:]
    assert recap(result.stdout)["greeter-lb"]["changed"] == 0
    assert fleet.ssh(fleet.balancer.name, files).stdout == before
    hello = fleet.run("greeter", "hello", fleet.balancer.address, "Teste")
    assert hello.stdout.strip() == "Olá, Teste!"


def test_tls_at_the_front_door_serves_a_plain_client_and_turns_off_again(
    fleet: LabSession, tmp_path: Path
) -> None:
    """greeter_lb_tls_enabled: a plain client that knows only the CA (one secure channel, no
    retries) gets every call answered, spread over every backend; a cleartext call is refused;
    the probe calls the front door over TLS; a rerun changes nothing. Turned off, the front door
    speaks cleartext again and the key leaves the host."""
    lb = fleet.balancer
    pki = tmp_path / "pki"
    python = str(REPO / ".venv" / "bin" / "python")
    fleet.run(python, "lab/tls.py", "--dir", str(pki), "--san", lb.address, "--san", lb.name)
    tls = {
        "greeter_lb_tls_enabled": True,
        "greeter_lb_tls_cert_src": str(pki / "server.pem"),
        "greeter_lb_tls_key_src": str(pki / "server.key"),
        "greeter_lb_tls_ca_src": str(pki / "ca.pem"),
    }
    # A key that is not the certificate's fails the preflight: nothing reaches the host, and the
    # front door goes on serving as before.
    wrong = json.dumps({**tls, "greeter_lb_tls_key_src": str(pki / "client.key")})
    refused = fleet.playbook("playbooks/balancer.yml", "-e", wrong, check=False)
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "is not the unencrypted PEM private key" in refused.stdout
    assert recap(refused.stdout)["greeter-lb"]["changed"] == 0
    pem = "sudo test -e /etc/haproxy/greeter-lb.pem"
    assert fleet.ssh(lb.name, pem, check=False).returncode == 1
    assert fleet.run("greeter", "hello", lb.address, "x").stdout.strip() == "Olá, x!"

    tls = json.dumps(tls)
    on = fleet.playbook("playbooks/balancer.yml", "-e", tls)
    assert recap(on.stdout)["greeter-lb"]["changed"] > 0
    key = "sudo stat -c '%a %U' /etc/haproxy/greeter-lb.pem"
    assert fleet.ssh(lb.name, key).stdout.split() == ["600", "root"]

    args = [sys.executable, str(PLAIN_CLIENT), front(fleet), "8", "--calls", "600"]
    report = json.loads(fleet.run(*args, "--ca", str(pki / "ca.pem")).stdout)
    assert report["failures"] == [] and report["ok"] == 600, report
    assert sorted(report["answered"]) == BACKENDS
    clear = fleet.run("greeter", "hello", lb.address, "x", "--deadline", "3", check=False)
    assert clear.returncode == 3, clear.stdout + clear.stderr

    probe = fleet.playbook("playbooks/probe.yml", "-e", tls)
    assert re.search(rf"{re.escape(front(fleet))}\s+yes\s+SERVING.*front-door", probe.stdout)
    again = fleet.playbook("playbooks/balancer.yml", "-e", tls)
    assert recap(again.stdout)["greeter-lb"]["changed"] == 0

    off = fleet.playbook("playbooks/balancer.yml")
    assert recap(off.stdout)["greeter-lb"]["changed"] > 0
    assert fleet.run("greeter", "hello", lb.address, "x").stdout.strip() == "Olá, x!"
    assert fleet.ssh(lb.name, pem, check=False).returncode == 1


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


def test_a_rerun_changes_nothing_on_the_hosts_or_the_balancer(fleet: LabSession) -> None:
    started = time.monotonic()
    result = fleet.playbook("site.yml")
    print(f"\n[frontdoor timing] no-op site.yml: {time.monotonic() - started:.1f} s", flush=True)
    counters = recap(result.stdout)
    for name in [*BACKENDS, "greeter-lb"]:
        assert counters[name]["changed"] == 0, (name, result.stdout[-4000:])
    assert "Set the host at the balancer" not in result.stdout  # no hook ran: nobody was drained


def test_a_backend_left_drained_is_put_back_by_the_next_deploy_saying_why(
    fleet: LabSession,
) -> None:
    """What a run interrupted between drain and ready leaves: a host serving the wanted release,
    drained at the balancer. The next deploy (nothing else to change) puts it back first,
    reports it changed and says why; the other hosts stay unchanged."""
    wait_all_up(fleet, BACKENDS)
    set_at_balancer(fleet, "greeter-2", "drain")
    assert at_balancer(fleet)["greeter-2"]["status"] == "DRAIN"
    result = fleet.playbook("playbooks/deploy.yml")
    output = " ".join(result.stdout.split())
    counters = recap(result.stdout)
    assert counters["greeter-2"]["changed"] > 0, output[-3000:]
    assert counters["greeter-1"]["changed"] == counters["greeter-3"]["changed"] == 0
    why = (
        r"greeter-2 serves the wanted release [0-9a-f]{40}-[0-9a-f]{12} but the balancer "
        r"holds it out \(DRAIN at greeter-lb\)"
    )
    assert re.search(why, output), output[-3000:]
    assert at_balancer(fleet)["greeter-2"]["status"].startswith("UP")


def test_a_balancer_reload_fails_no_call_and_keeps_a_drained_backend_drained(
    fleet: LabSession,
) -> None:
    """A configuration change reloads HAProxy under a plain client's load: no call fails, and a
    backend drained before the reload is still drained after it (the new process starts from the
    states the old one had), then the saved states are gone."""
    wait_all_up(fleet, BACKENDS)
    set_at_balancer(fleet, "greeter-3", "drain")
    pid = "sudo systemctl show -p MainPID --value haproxy.service"
    master = fleet.ssh(fleet.balancer.name, pid).stdout
    with PlainClient(fleet) as plain:
        time.sleep(2)
        started = time.monotonic()
        reload = fleet.playbook("playbooks/balancer.yml", "-e", "greeter_lb_maxconn=8001")
        took = time.monotonic() - started
        time.sleep(2)
    calls = plain.report["ok"] + len(plain.failures)
    print(
        f"\n[frontdoor] balancer reload ({took:.1f} s run): plain client {calls} calls, "
        f"{len(plain.failures)} failed",
        flush=True,
    )
    assert "RUNNING HANDLER [greeter_lb : Reload haproxy]" in reload.stdout, reload.stdout[-3000:]
    assert fleet.ssh(fleet.balancer.name, pid).stdout == master  # reloaded, not restarted
    assert at_balancer(fleet)["greeter-3"]["status"] == "DRAIN"
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 200
    saved = "sudo test -e /run/haproxy/server-state"
    assert fleet.ssh(fleet.balancer.name, saved, check=False).returncode == 1
    # Back as it was: the default configuration (another reload), every backend in rotation.
    set_at_balancer(fleet, "greeter-3", "ready")
    fleet.playbook("playbooks/balancer.yml")
    wait_all_up(fleet, BACKENDS)


def test_an_unreachable_balancer_fails_the_deploy_naming_it_before_any_drain(
    fleet: LabSession, tmp_path: Path
) -> None:
    """The balancer's link is down: the deploy fails in its state read naming the balancer, not
    a backend, and drains or switches nothing; the backends keep serving. With the link back,
    the rerun converges."""
    wait_all_up(fleet, BACKENDS)
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    (old,) = {row["commit"] for row in rows}
    new = fleet.push_commit(tmp_path, "while the balancer is away")
    targets = [f"{host.address}:50051" for host in fleet.hosts]
    assert fleet.balancer.veth, "lab/lab records the balancer's veth"
    subprocess.run(["ip", "link", "set", fleet.balancer.veth, "down"], check=True)
    try:
        started = time.monotonic()
        result = fleet.playbook("playbooks/deploy.yml", "-e", f"greeter_version={new}", check=False)
        took = time.monotonic() - started
        direct = fleet.run("greeter", "probe", *targets, "--json", check=False)
    finally:
        subprocess.run(["ip", "link", "set", fleet.balancer.veth, "up"], check=True)
    output = " ".join((result.stdout + result.stderr).split())
    print(
        f"\n[frontdoor timing] deploy failing at the unreachable balancer: {took:.1f} s", flush=True
    )
    assert result.returncode != 0
    said = "the balancer greeter-lb (group greeter_lb) could not be reached"
    assert said in output, output[-3000:]
    assert "nothing was drained and every host keeps its release" in output
    counters = recap(result.stdout)
    for name in BACKENDS:
        assert counters[name]["unreachable"] == 0, (name, output[-3000:])  # not blamed on them
    assert "Set the host at the balancer" not in result.stdout  # no backend was drained
    assert "lost while preparing" not in output and "lost during the rollout" not in output
    # The backends kept serving their release the whole time (called directly, not through it).
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert {row["commit"] for row in json.loads(direct.stdout)} == {old}
    wait_all_up(fleet, BACKENDS)
    started = time.monotonic()
    fleet.playbook("playbooks/deploy.yml", "-e", f"greeter_version={new}")
    print(f"[frontdoor timing] its rerun: {time.monotonic() - started:.1f} s", flush=True)
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    assert {row["commit"] for row in rows} == {new}
    wait_all_up(fleet, BACKENDS)


def test_a_run_killed_between_drain_and_ready_and_its_rerun_fail_no_call(
    fleet: LabSession, tmp_path: Path
) -> None:
    """The controller's ansible-playbook is killed once the first host is drained at the
    balancer; the rerun (breaking the killed run's lock by its id) ends with every host on the
    new release and in rotation. A plain client calls through both runs without a failure."""
    wait_all_up(fleet, BACKENDS)
    new = fleet.push_commit(tmp_path, "a run killed mid-rollout")
    deploy = ["ansible-playbook", "playbooks/deploy.yml", "-e", f"greeter_version={new}"]
    with PlainClient(fleet) as plain:
        time.sleep(2)
        started = time.monotonic()
        killed = subprocess.Popen(
            deploy, cwd=REPO, env={**fleet.env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            # Out of rotation (DRAIN, or DOWN once it restarts): the run is between drain and ready.
            while at_balancer(fleet)["greeter-1"]["status"].startswith("UP"):
                assert killed.poll() is None, "the run ended before it drained greeter-1"
                assert time.monotonic() - started < 600
                time.sleep(0.2)
        finally:
            os.killpg(killed.pid, signal.SIGKILL)  # the controller and every worker it forked
        out, _ = killed.communicate(timeout=60)
        left = at_balancer(fleet)["greeter-1"]["status"]
        said = " ".join(out.split())  # the YAML callback folds long lines
        run_id = re.search(r"This is run (\S+); it holds the deploy lock", said)
        assert run_id, out[-3000:]
        time.sleep(2)
        rerun = fleet.playbook(*deploy[1:], "-e", f"greeter_lock_break={run_id[1]}")
        took = time.monotonic() - started
        time.sleep(2)
    calls = plain.report["ok"] + len(plain.failures)
    print(
        f"\n[frontdoor] killed run (greeter-1 left {left}) and its rerun ({took:.1f} s): "
        f"plain client {calls} calls, {len(plain.failures)} failed",
        flush=True,
    )
    assert left != "UP" and not left.startswith("UP"), left
    assert recap(rerun.stdout)["greeter-1"]["changed"] > 0
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 200
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    assert {row["commit"] for row in rows} == {new}
    wait_all_up(fleet, BACKENDS)
