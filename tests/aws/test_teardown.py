"""playbooks/teardown.yml against the emulator: deletes everything, only when told to, once."""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import termios
import time

import pytest
from aws_helpers import BIN, REPO, Aws
from support.ansible import recap as ansible_recap
from support.watchdog import kill_tree

pytestmark = pytest.mark.aws


def recap(output: str) -> dict[str, int]:
    """localhost's counters from the PLAY RECAP."""
    counters = ansible_recap(output)
    assert "localhost" in counters, output
    return counters["localhost"]


def test_teardown_deletes_everything_and_a_rerun_changes_nothing(aws: Aws, stack: str) -> None:
    assert aws.provision(stack, "greeter_stack_instance_count=2").returncode == 0
    volumes = [
        mapping["Ebs"]["VolumeId"]
        for instance in aws.instances(stack)
        for mapping in instance["BlockDeviceMappings"]
    ]
    assert len(volumes) == 3  # two hosts and the balancer
    # A deploy killed on the controller leaves the fleet's deploy lock in the account.
    ssm = aws.client("ssm")
    lock, other = f"/greeter/{stack}/deploy-lock", f"/greeter/{stack}x/deploy-lock"
    for name in (lock, other):
        ssm.put_parameter(Name=name, Value='{"run_id": "0123456789abcdef"}', Type="String")

    first = aws.playbook(stack, "teardown.yml", "greeter_teardown_confirm=true")
    assert first.returncode == 0, first.stdout + first.stderr
    assert recap(first.stdout)["changed"] == 2  # the lock and the stack
    assert [p["Name"] for p in ssm.get_parameters(Names=[lock, other])["Parameters"]] == [other]

    assert aws.live_stacks(stack) == []
    assert {i["State"]["Name"] for i in aws.instances(stack)} == {"terminated"}
    assert aws.security_groups(stack) == []
    remaining = aws.client("ec2").describe_volumes(
        Filters=[{"Name": "volume-id", "Values": volumes}]
    )["Volumes"]
    assert remaining == [], "root volumes are deleted with their instances"

    again = aws.playbook(stack, "teardown.yml", "greeter_teardown_confirm=true")
    assert again.returncode == 0, again.stdout + again.stderr
    assert recap(again.stdout)["changed"] == 0


def test_teardown_without_confirmation_or_terminal_deletes_nothing(aws: Aws, stack: str) -> None:
    assert aws.provision(stack).returncode == 0

    result = aws.playbook(stack, "teardown.yml")  # stdin is /dev/null, as in CI

    assert result.returncode == 2, result.stdout + result.stderr
    assert "Not confirmed: nothing was deleted" in result.stdout
    assert [s["StackStatus"] for s in aws.live_stacks(stack)] == ["CREATE_COMPLETE"]
    assert len(aws.instances(stack, "running")) == 2  # the host and the balancer


def answer_prompt(aws: Aws, stack: str, answer: str) -> tuple[int, str]:
    """Run teardown.yml on a pseudo-terminal and type `answer` at its prompt."""
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [BIN / "ansible-playbook", "playbooks/teardown.yml"],
        cwd=REPO,
        env=aws.env(stack),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        # Make the pseudo-terminal the controlling terminal, as in a login shell: pause needs it.
        preexec_fn=lambda: (os.setsid(), fcntl.ioctl(0, termios.TIOCSCTTY, 0)),  # noqa: PLW1509
    )
    os.close(terminal)
    output = b""
    typed_at = 0.0
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the terminal closes when the playbook exits
                    break
                if not chunk:
                    break
                output += chunk
            # pause flushes keys typed before it reads, and under load the prompt shows well
            # before that: type until the next task starts. (Whitespace normalised: the terminal
            # may wrap the prompt.)
            seen = b" ".join(output.split())
            if (
                b"Type the stack name to go on" in seen
                and b"Stop unless the stack name was typed" not in seen
                and time.monotonic() - typed_at > 5
            ):
                os.write(controller, answer.encode() + b"\r")
                typed_at = time.monotonic()
        # Whitespace normalised: the terminal wraps long messages.
        text = " ".join(output.decode(errors="replace").split())
        try:
            return process.wait(timeout=60), text
        except subprocess.TimeoutExpired:
            pytest.fail(f"teardown.yml did not finish; it printed: {text}")
    finally:
        if process.poll() is None:  # a hung run: stop the playbook and its workers, by PID
            kill_tree(process.pid)
            process.wait()
        os.close(controller)


def test_teardown_asks_and_deletes_only_when_the_stack_name_is_typed(aws: Aws, stack: str) -> None:
    assert aws.provision(stack).returncode == 0

    returncode, output = answer_prompt(aws, stack, "greeter")
    assert returncode == 2, output
    assert "Not confirmed: nothing was deleted" in output
    assert len(aws.live_stacks(stack)) == 1

    returncode, output = answer_prompt(aws, stack, stack)
    assert returncode == 0, output
    assert aws.live_stacks(stack) == []
