"""lab/watchdog.py: the outer limit of every ansible run of the demo, the tests and the benchmark.

A stand-in for a stuck ansible-playbook (its output, then a wait that never ends, with a child of
its own in the background) shows what the watchdog promises: past the limit it says where the
run was stuck and stops everything the run started, and nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import watchdog

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]

# What ansible-playbook prints, then a hang: greeter-1 answered the task, greeter-2 never does.
STUCK_RUN = """
import subprocess, sys, time
print("PLAY [Prepare the release on every host] ****", flush=True)
print("TASK [greeter : Read the host's deployment state] ****", flush=True)
print("ok: [greeter-1]", flush=True)
print("ok: [greeter-2]", flush=True)
print("TASK [greeter : Refresh the package lists] ****", flush=True)
print("changed: [greeter-1]", flush=True)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_run_past_its_limit_is_reported_where_it_was_stuck_and_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(watchdog.Stuck) as stuck:
        watchdog.run([sys.executable, "-c", STUCK_RUN, str(pid_file)], timeout=3)
    assert time.monotonic() - started < 30, "the watchdog did not stop the run promptly"
    report = stuck.value.report
    assert "was still running after 3 s: stopped it" in report, report
    assert "stuck in TASK [greeter : Refresh the package lists]" in report, report
    assert "of play [Prepare the release on every host]" in report, report
    assert "answered it: greeter-1; no answer yet from: greeter-2" in report, report
    assert "changed: [greeter-1]" in report, report  # the last lines of output
    assert "changed: [greeter-1]" in stuck.value.stdout
    # Everything the run started is stopped, its background child too (same process group).
    assert gone(int(pid_file.read_text())), "the stuck run's child outlived the watchdog"


def test_a_run_within_its_limit_returns_its_output_and_status() -> None:
    done = watchdog.run([sys.executable, "-c", "print('out'); import sys; sys.exit(3)"], 30)
    assert (done.returncode, done.stdout) == (3, "out\n")


def test_the_command_line_exits_124_and_prints_the_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "lab" / "watchdog.py"), "--timeout", "3", "--",
         sys.executable, "-c", STUCK_RUN, str(tmp_path / "child.pid")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 124, result.stderr
    assert "TASK [greeter : Refresh the package lists]" in result.stdout  # echoed while it ran
    assert "no answer yet from: greeter-2" in result.stderr
    assert gone(int((tmp_path / "child.pid").read_text()))


def test_kill_tree_ends_an_ansible_run_and_the_workers_that_left_its_group(tmp_path: Path) -> None:
    """A SIGKILL to ansible-playbook's process group leaves its workers running (ansible-core's
    workers call setsid); kill_tree ends the run and every process it started, as a dead
    controller would."""
    playbook = tmp_path / "sleep.yml"
    playbook.write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.command: sleep 300\n      changed_when: false\n"
    )
    ansible = Path(sys.executable).with_name("ansible-playbook")
    run = subprocess.Popen(
        [str(ansible), "-i", "localhost,", "-c", "local", str(playbook),
         "-e", f"ansible_python_interpreter={sys.executable}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # the worker runs the task once `sleep 300` runs under it
            tree = _tree(run.pid)
            if any(_command(pid).startswith("sleep 300") for pid in tree):
                break
            assert run.poll() is None, "the run ended before its task started"
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.2)
        sessions = {os.getsid(pid) for pid in tree if _command(pid)}
        assert len(sessions) > 1, "every process stayed in the run's session"  # setsid'd workers
        watchdog.kill_tree(run.pid)
        assert run.wait(timeout=30) == -9
        deadline = time.monotonic() + 10
        while [pid for pid in tree if _alive(pid)]:
            assert time.monotonic() < deadline, [_command(p) for p in tree if _alive(p)]
            time.sleep(0.1)
    finally:
        if run.poll() is None:
            watchdog.kill_tree(run.pid)


def _tree(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(p for child in children for p in _tree(int(child)))]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running and not a zombie (a zombie is reaped by whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False
