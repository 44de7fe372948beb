"""The deployment on lab hosts: site.yml, reruns, rolling upgrade, health gate, rollback, faults.

One lab of three hosts (LAB_NAME ``deploy``, or $LAB_DEPLOY_NAME; beside the session's ``test``
lab whose tests need untouched hosts) is shared by every test in this file, in file order: each
test starts from the fleet state the previous one left, as a person operating the fleet would.
Timings of the first deploy, the no-op rerun and the upgrade are printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support import watchdog
from support.ansible import recap, with_ssh_options

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
# LAB_DEPLOY_NAME picks another lab name, so a second checkout can run these tests meanwhile.
LAB_NAME = os.environ.get("LAB_DEPLOY_NAME", "deploy")
TIMINGS: dict[str, float] = {}


# --- helpers -------------------------------------------------------------------------------------


def note(what: str, seconds: float) -> None:
    TIMINGS[what] = round(seconds, 1)
    print(f"\n[deploy timing] {what}: {seconds:.1f} s", flush=True)


def targets(lab: LabSession) -> list[str]:
    return [f"{host.address}:50051" for host in lab.hosts]


def probe(lab: LabSession, *extra: str) -> tuple[int, list[dict]]:
    """`greeter probe --json` over the whole fleet, from the controller."""
    result = lab.run("greeter", "probe", *targets(lab), "--json", *extra, check=False)
    return result.returncode, json.loads(result.stdout or "[]")


def served_commits(lab: LabSession) -> list[str]:
    rc, rows = probe(lab)
    assert rc == 0, rows
    return [row["commit"] for row in rows]


def current(lab: LabSession, host_index: int) -> str:
    """The commit of the release `current` points to (releases/<commit>-<config digest>)."""
    link = lab.ssh(lab.hosts[host_index], "readlink /opt/greeter/current").stdout.strip()
    return link.rsplit("/", 1)[-1][:40]


def batches(output: str) -> list[list[str]]:
    """Hosts per rollout batch, read from the switch task of each batch in the output."""
    found, collecting = [], None
    for line in output.splitlines():
        if line.startswith("TASK [greeter : Switch current"):
            collecting = []
            found.append(collecting)
        elif line.startswith(("TASK [", "RUNNING HANDLER", "PLAY ")):
            collecting = None
        elif collecting is not None:
            match = re.match(r"^(?:ok|changed): \[(\S+)\]", line)
            if match:
                collecting.append(match[1])
    return [sorted(batch) for batch in found if batch]  # batches after a stop switch nobody


class Load:
    """`greeter bench` round-robin over the fleet in back-to-back 4 s runs until stopped."""

    def __init__(self, lab: LabSession) -> None:
        self.lab, self.reports, self.problems = lab, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # A steady 300 calls/s: every second of a restart is covered, and the machine's
            # cores stay with the deploy the load watches.
            args = ("greeter", "bench", *targets(self.lab), "-c", "8", "-z", "4s", "--rate", "300")
            result = self.lab.run(*args, "--json", check=False, timeout=120)
            try:
                self.reports.append(json.loads(result.stdout))
            except json.JSONDecodeError:
                self.problems.append(f"exit {result.returncode}: {result.stderr[-500:]}")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    @property
    def calls(self) -> int:
        return sum(report["count"] for report in self.reports)

    @property
    def failed(self) -> int:
        return sum(n for r in self.reports for code, n in r["status_codes"].items() if code != "OK")


# --- the shared fleet ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(extra_lab: Callable[[str, int], LabSession]) -> Iterator[LabSession]:
    """Three fresh lab hosts with the stack created in the lab's emulator."""
    lab = extra_lab(LAB_NAME, 3)
    lab.playbook("playbooks/provision.yml")
    yield lab
    print(f"\n[deploy timing] summary: {json.dumps(TIMINGS)}", flush=True)


@pytest.fixture(scope="module")
def base_commit(fleet: LabSession) -> str:
    """The commit lab/lab up put on the mirror's main (and in the inventory): what site.yml deploys.

    Not the working tree's HEAD: others may commit while the tests run.
    """
    return json.loads((fleet.state / "lab.json").read_text())["commit"]


# --- the tests, in the order an operator meets them ----------------------------------------------


def test_bad_variables_fail_before_any_host_changes(fleet: LabSession) -> None:
    cases = {
        "greeter_port=not-a-port": "greeter_port",
        "greeter_version=no-such-version": "is not a branch or tag",
        "greeter_keep_releases=0": "greeter_keep_releases at least 1",
    }
    for extra, message in cases.items():
        result = fleet.playbook("playbooks/deploy.yml", "-e", extra, check=False)
        assert result.returncode != 0, extra
        assert message in " ".join((result.stdout + result.stderr).split()), extra
        assert all(c["changed"] == 0 for c in recap(result.stdout).values()), result.stdout
    for host in fleet.hosts:
        untouched = fleet.ssh(
            host, "test ! -e /opt/greeter && ! getent passwd greeter", check=False
        )
        assert untouched.returncode == 0, f"{host.name} was changed by a rejected run"


# Where a run that changes nothing may still leave traces: Ansible's own temporary files in the
# login user's home, the journal, /tmp (where the marker is); and cloud-init's own records, which
# it writes when it finishes the fresh hosts' busy first boot meanwhile.
CHURN = ("/tmp", "/var/tmp", "/var/log", "/home/ubuntu", "/var/lib/cloud")
CHANGED_SINCE_MARKER = (
    r"sudo find / -xdev \( -path /proc -o -path /sys -o -path /run -o -path /dev \) -prune"
    " -o -newer /tmp/check-marker -print 2>/dev/null; true"
)


def test_check_mode_on_fresh_hosts_changes_nothing(fleet: LabSession) -> None:
    for host in fleet.hosts:  # whatever a real run would write is newer than this marker
        fleet.ssh(host, "sudo touch /tmp/check-marker && sleep 1.1")
    result = fleet.playbook("playbooks/deploy.yml", "--check", "--diff")
    assert "greeter.service" in result.stdout  # the diff shows the unit it would write
    for host in fleet.hosts:
        changed = fleet.ssh(host, CHANGED_SINCE_MARKER).stdout.split()
        written = [path for path in changed if not path.startswith(CHURN)]
        assert written == [], f"{host.name}: --check wrote {written}"
        assert fleet.ssh(host, "test ! -e /opt/greeter", check=False).returncode == 0


def test_site_deploys_a_fresh_fleet_that_serves_the_commit(
    fleet: LabSession, base_commit: str
) -> None:
    started = time.monotonic()
    result = fleet.playbook("site.yml")
    note("first deploy of 3 hosts (site.yml)", time.monotonic() - started)
    assert set(recap(result.stdout)) >= {h.name for h in fleet.hosts}
    rc, rows = probe(fleet, "--expect-commit", base_commit)
    assert rc == 0, rows
    assert [row["health"] for row in rows] == ["SERVING"] * 3
    for host in fleet.hosts:
        service = fleet.ssh(host, "systemctl show -p User,Type,ActiveState greeter").stdout
        assert "User=greeter" in service
        assert "Type=notify" in service
        assert "ActiveState=active" in service
        # The package's own build compiled the stubs into the release's venv (no compile step).
        stubs = fleet.ssh(
            host, "/opt/greeter/current/venv/bin/python -c"
            " 'from greeter import hello_pb2, hello_pb2_grpc; print(hello_pb2_grpc.__file__)'",
        ).stdout  # fmt: skip
        assert "/venv/lib/" in stubs and stubs.strip().endswith("/greeter/hello_pb2_grpc.py"), stubs


def test_logs_shows_every_hosts_journal(fleet: LabSession) -> None:
    result = fleet.playbook("playbooks/logs.yml", "-e", "greeter_log_lines=20")
    text = " ".join(result.stdout.split())  # the YAML callback folds long lines
    for host in fleet.hosts:
        assert re.search(rf'{host.name} greeter-server\[\d+\]: .*?"event": "serving"', text)


def test_a_rerun_changes_nothing(fleet: LabSession) -> None:
    started = time.monotonic()
    result = fleet.playbook("playbooks/deploy.yml")
    note("no-op rerun of 3 hosts (deploy.yml)", time.monotonic() - started)
    counters = recap(result.stdout)
    assert len(counters) == 3
    assert all(c["changed"] == 0 for c in counters.values()), result.stdout


def test_check_mode_on_the_deployed_fleet_reports_no_change(fleet: LabSession) -> None:
    result = fleet.playbook("playbooks/deploy.yml", "--check", "--diff")
    assert all(c["changed"] == 0 for c in recap(result.stdout).values()), result.stdout


def test_a_rerun_notices_and_fixes_drift(fleet: LabSession, base_commit: str) -> None:
    first, second = fleet.hosts[0], fleet.hosts[1]
    fleet.ssh(
        first, "sudo sed -i 's/^Restart=on-failure/Restart=no/' /etc/systemd/system/greeter.service"
    )
    fleet.ssh(second, "sudo systemctl stop greeter")
    result = fleet.playbook("playbooks/deploy.yml")
    counters = recap(result.stdout)
    assert counters[first.name]["changed"] > 0
    assert counters[second.name]["changed"] > 0
    assert (
        "Restart=on-failure" in fleet.ssh(first, "cat /etc/systemd/system/greeter.service").stdout
    )
    assert served_commits(fleet) == [base_commit] * 3


def test_kill_9_of_the_service_is_restarted_by_systemd(fleet: LabSession) -> None:
    host = fleet.hosts[2]
    before = fleet.ssh(host, "systemctl show -p MainPID --value greeter").stdout.strip()
    fleet.ssh(host, f"sudo kill -9 {before}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = fleet.ssh(host, "systemctl show -p MainPID,ActiveState greeter").stdout
        if "ActiveState=active" in after and f"MainPID={before}\n" not in after + "\n":
            break
        time.sleep(1)
    else:
        pytest.fail(f"greeter did not come back after kill -9: {after}")
    rc, rows = probe(fleet)
    assert rc == 0, rows


class BranchMover:
    """Moves `branch` on the lab's mirror to `to` as soon as the first host serves `start`, and
    notes what the other hosts served at that moment."""

    def __init__(self, lab: LabSession, branch: str, start: str, to: str) -> None:
        self.lab, self.branch, self.start, self.to = lab, branch, start, to
        self.others_at_move: list[str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        first = targets(self.lab)[0]
        while not self._stop.wait(0.3):
            result = self.lab.run("greeter", "probe", first, "--json", check=False, timeout=60)
            rows = json.loads(result.stdout or "[]")
            if rows and rows[0].get("commit") == self.start:
                subprocess.run(
                    ["git", "-C", str(self.lab.git_mirror), "update-ref",
                     f"refs/heads/{self.branch}", self.to],
                    check=True,
                )  # fmt: skip
                _, others = probe(self.lab)
                self.others_at_move = [row.get("commit", "") for row in others[1:]]
                return

    def __enter__(self) -> BranchMover:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_upgrade_under_load_fails_no_call(
    fleet: LabSession, base_commit: str, tmp_path: Path
) -> None:
    """Deployed by branch name; the branch moves once the first host serves the release, and
    the other hosts still get the commit resolved at the start (once per run)."""
    new = fleet.push_commit(tmp_path, "Upgrade marker")
    branch = f"test/{new[:12]}"  # push_commit's branch
    moved = subprocess.run(
        ["git", "-C", str(fleet.git_mirror), "commit-tree", f"{new}^{{tree}}", "-p", new,
         "-m", "The branch moved during the rollout"],
        check=True, capture_output=True, text=True,
        env=dict(os.environ, GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
                 GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid"),
    ).stdout.strip()  # fmt: skip
    with Load(fleet) as load, BranchMover(fleet, branch, new, moved) as mover:
        time.sleep(3)
        started = time.monotonic()
        result = fleet.playbook(
            "playbooks/deploy.yml",
            "-e",
            f"greeter_version={branch}",
            "-e",
            '{"greeter_serial": [1, 2]}',
        )
        note("upgrade of 3 hosts under load (deploy.yml)", time.monotonic() - started)
        time.sleep(3)
    # The branch moved while greeter-2 and greeter-3 still served the old release.
    assert mover.others_at_move == [base_commit] * 2, mover.others_at_move
    assert not load.problems, load.problems
    assert load.calls > 100, load.reports
    assert load.failed == 0, [r["errors"] for r in load.reports if r["errors"]]
    # One host first, then the other two, in name order (deploy.yml: order: sorted).
    assert batches(result.stdout) == [["greeter-1"], ["greeter-2", "greeter-3"]], result.stdout
    assert served_commits(fleet) == [new] * 3
    fleet.ssh(fleet.hosts[0], f"test -d /opt/greeter/builds/{base_commit}")
    previous = fleet.ssh(fleet.hosts[0], "readlink /opt/greeter/previous").stdout.strip()
    assert previous.rsplit("/", 1)[-1].startswith(f"{base_commit}-"), previous


def test_a_release_that_fails_health_is_rolled_back_and_stops_the_rollout(
    fleet: LabSession, tmp_path: Path
) -> None:
    good = served_commits(fleet)[0]

    def break_server(clone: Path) -> None:
        server = clone / "service" / "src" / "greeter" / "server.py"
        server.write_text(
            server.read_text()
            + "\n\ndef main(argv=None):  # a deliberately broken release\n"
            + "    raise SystemExit('this release refuses to start')\n"
        )

    bad = fleet.push_commit(tmp_path, "Break the server", break_server)
    result = fleet.playbook(
        "playbooks/deploy.yml", "-e", f"greeter_version={bad}", "-e", "greeter_verify_timeout=5",
        check=False,
    )  # fmt: skip
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert re.search(rf"greeter-1: release {bad}-[0-9a-f]{{12}} failed \(", output), output[-3000:]
    assert re.search(rf"rolled back to {good}-[0-9a-f]{{12}}, which serves again", output)
    counters = recap(result.stdout)
    assert counters["greeter-1"]["failed"] == 1
    assert batches(result.stdout) == [["greeter-1"]]  # nobody after the first host was touched
    assert [current(fleet, i) for i in range(3)] == [good] * 3
    assert served_commits(fleet) == [good] * 3


def test_rollback_returns_the_fleet_to_the_previous_release(
    fleet: LabSession, base_commit: str
) -> None:
    upgraded = served_commits(fleet)[0]
    assert upgraded != base_commit
    fleet.playbook("playbooks/rollback.yml")
    assert served_commits(fleet) == [base_commit] * 3
    # Rolling back again goes back to where we started, like `cd -`.
    fleet.playbook("playbooks/rollback.yml", "--limit", "greeter-1")
    assert served_commits(fleet) == [upgraded, base_commit, base_commit]
    fleet.playbook("playbooks/rollback.yml", "-e", f"greeter_rollback_to={base_commit}")
    assert served_commits(fleet) == [base_commit] * 3


def test_a_host_lost_mid_rollout_stops_it_and_the_switched_hosts_go_back(
    fleet: LabSession, tmp_path: Path
) -> None:
    new = fleet.push_commit(tmp_path, "Another release")
    veth = json.loads((fleet.state / "lab.json").read_text())["hosts"][2]["veth"]
    # A dead peer must be noticed in seconds, not after TCP's retransmission timeout.
    env = with_ssh_options(fleet.env, "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=2")
    args = ["ansible-playbook", "playbooks/deploy.yml", "-e", f"greeter_version={new}"]
    args += ["-e", '{"greeter_serial": 1}']
    env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(tmp_path / "cp")  # no master without those options
    task = ""  # the task whose results the output shows now

    def watch(line: str) -> None:
        nonlocal task
        if line.startswith("TASK ["):
            task = line
        # greeter-2's batch has switched: greeter-3 goes away before its turn comes. (The other
        # hosts' "skipping" lines and the task timer come between the task and this line.)
        elif line.startswith("changed: [greeter-2]") and "Switch current" in task:
            subprocess.run(["ip", "link", "set", veth, "down"], check=True)

    with watchdog.Watched(args, cwd=REPO, env=env, on_line=watch) as play:
        done = play.wait(timeout=600)
    rc, output = done.returncode, done.stdout + done.stderr
    try:
        assert rc != 0
        assert re.search(r"greeter-3.*UNREACHABLE", output), output[-3000:]
        assert recap(output)["greeter-3"]["unreachable"] == 1
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    time.sleep(2)
    # greeter-1 and greeter-2 had switched; the run stopped at greeter-3's batch and put them back.
    text = " ".join(output.split())
    assert "greeter-3: lost during the rollout" in text, text[-3000:]
    assert "the run stopped after this host switched" in text, text[-3000:]
    old = current(fleet, 2)
    assert old != new
    assert [current(fleet, i) for i in range(3)] == [old] * 3
    assert served_commits(fleet) == [old] * 3
    fleet.playbook("playbooks/deploy.yml", "-e", f"greeter_version={new}")
    assert served_commits(fleet) == [new] * 3
