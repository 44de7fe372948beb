#!/usr/bin/env python3
"""The outer watchdog of every ansible run the demo, the tests and the benchmark start.

The role bounds each task that waits on something remote; this is the last line: a command that
runs past its time limit is stopped, with everything it started (it runs in its own process
group), after printing where it was stuck: for an Ansible run the play, the task, how long it
had been running, which hosts had answered it and which had not, and the last lines of output.

    lab/watchdog.py --timeout 1800 -- ansible-playbook site.yml    # exit 124 when it fires
    run(argv, timeout=600, env=..., cwd=...)   # from Python: raises Stuck when it fires

Only the Python standard library, like the rest of lab/.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

TIMED_OUT = 124  # the exit status of coreutils' timeout, which scripts already know
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL to the command's process group
TAIL_LINES = 25

_TASK = re.compile(r"^(TASK|RUNNING HANDLER) \[(?P<name>.*)\]")
_PLAY = re.compile(r"^PLAY \[(?P<name>.*)\]")
# ok: [greeter-1], changed: [greeter-2 -> localhost], fatal: [greeter-3]: FAILED!, ...
_RESULT = re.compile(
    r"^(ok|changed|fatal|failed|skipping|unreachable|FAILED - RETRYING): \[(?P<host>[^\]\s]+)"
)
_RECAP = re.compile(r"^(?P<host>\S+)\s+: ok=\d+")


class Stuck(Exception):
    """The command ran past its time limit and was stopped; str() says where it was stuck."""

    def __init__(self, report: str, stdout: str, stderr: str) -> None:
        super().__init__(report)
        self.report, self.stdout, self.stderr = report, stdout, stderr


class Progress:
    """Where an ansible-playbook run is, read from its default (or yaml) output line by line."""

    def __init__(self) -> None:
        self.play = ""
        self.task = ""
        self.task_started = 0.0
        self.answered: list[str] = []  # hosts with a result for the current task
        self.hosts: list[str] = []  # every host seen in the run, in order of appearance
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        with self._lock:
            self.tail.append(line)
            if found := _PLAY.match(line):
                self.play, self.task, self.answered = found["name"], "", []
            elif found := _TASK.match(line):
                self.task, self.task_started, self.answered = found["name"], time.monotonic(), []
            elif (found := _RESULT.match(line)) or (found := _RECAP.match(line)):
                host = found["host"]
                if host not in self.hosts:
                    self.hosts.append(host)
                if _RESULT.match(line) and host not in self.answered:
                    self.answered.append(host)

    def report(self, command: str, timeout: float) -> str:
        with self._lock:
            lines = [f"watchdog: `{command}` was still running after {timeout:.0f} s: stopped it"]
            if self.task:
                ago = time.monotonic() - self.task_started
                lines.append(
                    f"watchdog: stuck in TASK [{self.task}] of play [{self.play}], "
                    f"running for {ago:.0f} s"
                )
                waiting = [h for h in self.hosts if h not in self.answered]
                unknown = "unknown (no host answered an earlier task)"
                lines.append(
                    f"watchdog: answered it: {', '.join(self.answered) or 'no host'}; "
                    f"no answer yet from: {', '.join(waiting) or unknown}"
                )
            lines.append(f"watchdog: last {len(self.tail)} lines of its output:")
            lines += [f"    {line}" for line in self.tail]
            return "\n".join(lines)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the group. Not kill(0): a zombie whose
    parent died waits for init to reap it, and on this kind of machine PID 1 may never do so."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, signum: int) -> bool:
    """Signal the command's own process group; False once nothing is left in it."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, as if its machine had died.

    Not its process group alone: ansible-core's workers call setsid, so a killed
    ansible-playbook's group leaves them running, orphaned, still acting on hosts. Each
    process is frozen (SIGSTOP) before its children are read, so none starts another in
    between; then all are killed.
    """
    frozen, todo = [], [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(current, signal.SIGSTOP)
            frozen.append(current)
        todo.extend(_children(current))
    for current in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(current, signal.SIGKILL)


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group the command leads, then SIGKILL what is left after `grace`.

    The group id is the command's PID (it was started in a session of its own), so this reaches
    everything it started and never anything else on the machine.
    """
    pgid = proc.pid
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


class Watched:
    """A command started in a process group of its own, its output read while it runs.

    `wait(timeout)` returns its CompletedProcess, or, past `timeout` seconds, prints where it was
    stuck, stops its whole process group and raises Stuck. Leaving the `with` block (also by an
    exception: a failed assertion, Ctrl-C, a test's own timeout) stops whatever still runs.
    `on_line` sees every line of stdout and stderr as it comes (a test acting mid-run).
    """

    def __init__(
        self,
        argv: Sequence[str | Path],
        *,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        echo: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.args = [str(a) for a in argv]
        self.progress = Progress()
        self._out: list[str] = []
        self._err: list[str] = []
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stopping it reaches all it started
        )
        self._readers = [
            threading.Thread(
                target=self._pump, args=(stream, sink, _writer(echo_to) if echo else None, on_line),
                daemon=True,
            )
            for stream, sink, echo_to in (
                (self.proc.stdout, self._out, sys.stdout),
                (self.proc.stderr, self._err, sys.stderr),
            )
        ]  # fmt: skip
        for reader in self._readers:
            reader.start()

    def _pump(self, stream, sink: list[str], echo, on_line) -> None:
        for line in iter(stream.readline, ""):
            sink.append(line)
            self.progress.feed(line)
            if echo is not None:
                echo(line)
            if on_line is not None:
                on_line(line)
        stream.close()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            report = self.progress.report(shlex.join(self.args), timeout)
            print(report, file=sys.stderr, flush=True)
            self.stop()
            raise Stuck(report, "".join(self._out), "".join(self._err)) from None
        self._join()
        return subprocess.CompletedProcess(self.args, code, "".join(self._out), "".join(self._err))

    def stop(self) -> None:
        """Stop the command and everything it started (its process group), then its readers."""
        stop_group(self.proc)
        self._join()

    def _join(self) -> None:
        # A process that escaped the group may still hold a pipe open: do not wait for it forever.
        for reader in self._readers:
            reader.join(timeout=5)

    def __enter__(self) -> Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            self.stop()


def run(
    argv: Sequence[str | Path],
    timeout: float,
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    echo: bool = False,
) -> subprocess.CompletedProcess:
    """Run `argv` capturing its output (echoed live too when `echo`), at most `timeout` seconds.

    Past the limit: print the report to stderr, stop the command's whole process group and
    raise Stuck. Also stops it when the caller is interrupted (Ctrl-C, a test's own timeout).
    """
    with Watched(argv, cwd=cwd, env=env, echo=echo) as watched:
        return watched.wait(timeout)


def _writer(stream) -> Callable[[str], None]:
    def write(line: str) -> None:
        stream.write(line)
        stream.flush()

    return write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lab/watchdog.py",
        description="Run a command; past --timeout seconds say where it was stuck and stop it.",
    )
    parser.add_argument("--timeout", type=float, required=True, help="seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    # Ctrl-C or a kill of this process stops the command too: it is in another process group,
    # so the terminal's SIGINT does not reach it by itself.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return run(command, args.timeout, echo=True).returncode
    except Stuck:
        return TIMED_OUT
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
