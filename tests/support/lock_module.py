"""Run the role's deploy lock module (roles/greeter/library/greeter_lock.py) as Ansible runs a
module, in processes of their own, and release several at the same instant.

A ``Worker`` is one process that has imported boto3 and Ansible and loaded the module once; for
each call it takes the module's arguments, builds the SSM client the module will ask boto3 for,
says it is ready, waits for the barrier file and then runs the module's ``main()`` (arguments and
result as Ansible passes them: ``ANSIBLE_MODULE_ARGS`` in, the JSON result out). Workers released
by one ``touch`` reach the API within a millisecond or two of each other: a real race, not a queue
of process start-ups (a fresh Python with boto3 and Ansible takes seconds on a loaded machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "roles" / "greeter" / "library" / "greeter_lock.py"

CHILD = r"""
import contextlib, functools, io, json, runpy, sys, time
from pathlib import Path
import boto3
from ansible.module_utils import basic

module = runpy.run_path(sys.argv[1])  # the module's globals, its main() among them
# Only the client's construction moves before the barrier: same arguments, same client.
module["boto3"].client = functools.lru_cache(maxsize=None)(boto3.client)
for line in sys.stdin:
    call = json.loads(line)
    basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": call["args"]}).encode()
    basic._ANSIBLE_PROFILE = "legacy"
    region = call["args"].get("region") or None
    module["boto3"].client("ssm", region_name=region, config=module["CLIENT_CONFIG"])
    print("ready", flush=True)
    while call["barrier"] and not Path(call["barrier"]).exists():
        time.sleep(0.0002)
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            module["main"]()
        except SystemExit as end:
            code = end.code or 0
    print(json.dumps({"returncode": code, "output": out.getvalue()}), flush=True)
"""


@dataclass
class Outcome:
    returncode: int
    result: dict

    @property
    def won(self) -> bool:
        return self.returncode == 0

    @property
    def msg(self) -> str:
        return " ".join(str(self.result.get("msg", "")).split())


class Worker:
    """One warm process running the module on request."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(MODULE)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, args: dict, barrier: Path | None) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"args": args, "barrier": str(barrier or "")}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line == "ready\n", f"worker not ready: {line!r}"

    def receive(self) -> Outcome:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the worker died"
        answer = json.loads(line)
        return Outcome(answer["returncode"], json.loads(answer["output"]))

    def call(self, args: dict) -> Outcome:
        self.send(args, None)
        return self.receive()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def race(workers: list[Worker], arg_sets: list[dict], scratch: Path) -> list[Outcome]:
    """Each argument set on its own worker, all released at the same instant."""
    barrier = scratch / f"barrier-{time.monotonic_ns()}"
    for worker, args in zip(workers, arg_sets, strict=False):
        worker.send(args, barrier)
    barrier.touch()
    return [worker.receive() for worker in workers[: len(arg_sets)]]
