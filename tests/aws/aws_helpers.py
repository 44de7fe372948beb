"""Helpers for the stack tests: the emulator, the real CLIs pointed at it, and boto3 checks.

Every test gets its own stack name, so the tests share the emulator without seeing each other.
provision.yml requires a key pair that exists in the stack's region: `provision` imports the
tests' key pair KEY_NAME there first (a public key only: nothing ever logs in).
The playbooks and the inventory reach the emulator only through AWS_ENDPOINT_URL and dummy
credentials, exactly as they would reach AWS; nothing connects to the fake public IPs moto hands
out (provision runs with greeter_stack_wait_for_ssh=false).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import emulator, watchdog
from support.net import free_port as free_loopback_port  # noqa: F401 -- the old name

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv running pytest holds ansible-playbook too
REGION = "us-east-1"
ADMIN_CIDR = "203.0.113.7/32"
CLIENT_CIDR = "198.51.100.0/24"
KEY_NAME = "greeter-tests"
KEY_MATERIAL = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFHOJMWW6815GX3rIizjWz8wReKDRpVa3WSNo/zwU5Za"
EMULATOR_START_SECONDS = 120  # moto is ready in 2-5 s; a loaded 2-core CI box is slower


def start_emulator(ready_file: Path) -> tuple[subprocess.Popen[str], str]:
    """Start lab/emulator.py on a free loopback port; return it and its endpoint once it answers."""
    process = subprocess.Popen(
        [sys.executable, REPO / "lab" / "emulator.py", "--port", "0", "--ready-file", ready_file],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + EMULATOR_START_SECONDS
    while not ready_file.exists():
        if process.poll() is not None:
            raise RuntimeError(
                f"emulator exited with {process.returncode}: {process.stdout.read()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("emulator did not become ready in time")
        time.sleep(0.1)
    return process, ready_file.read_text().strip()


def stop_emulator(process: subprocess.Popen[str]) -> int:
    """SIGTERM by PID (never by name) and wait; returns the exit code."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def emulator_client(endpoint: str, service: str, region: str = REGION) -> Any:
    """A boto3 client of the emulator at `endpoint`, with moto's dummy credentials."""
    return emulator.client(endpoint, service, region)


def unwrap(value: Any) -> Any:
    """ansible-core 2.19 JSON wraps strings as {"__ansible_unsafe": ...}; return plain data."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap(item) for item in value]
    return value


@dataclass
class Aws:
    """The emulator's endpoint plus helpers that run the project's real commands against it."""

    endpoint: str

    def env(self, stack: str, **extra: str) -> dict[str, str]:
        """The environment a person with credentials would have, pointed at the emulator."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "ANSIBLE_", "GREETER_"))
        }
        env.update(
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",  # noqa: S106 - moto's dummy credentials
            AWS_REGION=REGION,
            AWS_DEFAULT_REGION=REGION,
            AWS_EC2_METADATA_DISABLED="true",  # never ask 169.254.169.254 for credentials
            GREETER_STACK_NAME=stack,
            ANSIBLE_INVENTORY=str(REPO / "inventory"),
            ANSIBLE_NOCOLOR="1",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        env.update(extra)
        return env

    def run(
        self, stack: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run a command from the repository root (so ansible.cfg applies), stdin closed, under
        the watchdog (past `timeout` it is stopped, and Stuck says where it was stuck)."""
        return watchdog.run(list(args), timeout, cwd=REPO, env=env or self.env(stack))

    def playbook(
        self, stack: str, playbook: str, *extra_vars: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = [str(BIN / "ansible-playbook"), f"playbooks/{playbook}"]
        for assignment in extra_vars:
            args += ["-e", assignment]
        return self.run(stack, *args, env=env)

    def on_localhost(self, stack: str, template: str, env: dict[str, str] | None = None) -> str:
        """`template` as the implicit localhost (where provision.yml runs) renders it, with the
        inventory's variables: the text ansible's debug module printed."""
        shown = self.run(
            stack,
            str(BIN / "ansible"),
            "localhost",
            "-m",
            "ansible.builtin.debug",
            "-a",
            json.dumps({"msg": template}),
            env=env,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        return shown.stdout

    def import_key_pair(self, region: str = REGION) -> None:
        """The tests' key pair KEY_NAME in `region`, once."""
        ec2 = self.client("ec2", region)
        if not ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [KEY_NAME]}])[
            "KeyPairs"
        ]:
            ec2.import_key_pair(KeyName=KEY_NAME, PublicKeyMaterial=KEY_MATERIAL)

    def provision(
        self,
        stack: str,
        *extra_vars: str,
        env: dict[str, str] | None = None,
        region: str = REGION,
    ) -> subprocess.CompletedProcess[str]:
        """provision.yml with the test CIDRs, the tests' key pair (imported in `region`, where
        `env` puts the stack) and no SSH wait (no host stands behind moto)."""
        self.import_key_pair(region)
        return self.playbook(
            stack,
            "provision.yml",
            f"greeter_stack_admin_cidr={ADMIN_CIDR}",
            f"greeter_stack_client_cidr={CLIENT_CIDR}",
            f"greeter_stack_key_name={KEY_NAME}",
            "greeter_stack_wait_for_ssh=false",
            *extra_vars,
            env=env,
        )

    def inventory(self, stack: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        """`ansible-inventory --list` as plain data; fails the test if the command fails."""
        result = self.run(stack, str(BIN / "ansible-inventory"), "--list", env=env)
        assert result.returncode == 0, result.stderr
        return unwrap(json.loads(result.stdout))

    def client(self, service: str, region: str = REGION) -> Any:
        return emulator_client(self.endpoint, service, region)

    def instances(self, stack: str, *states: str, region: str = REGION) -> list[dict[str, Any]]:
        """The stack's instances (tagged by CloudFormation), optionally only in these states."""
        filters = [{"Name": "tag:aws:cloudformation:stack-name", "Values": [stack]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        ec2 = self.client("ec2", region)
        pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
        return [
            instance
            for page in pages
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        ]

    def security_groups(self, stack: str) -> list[dict[str, Any]]:
        filters = [{"Name": "tag:aws:cloudformation:stack-name", "Values": [stack]}]
        return self.client("ec2").describe_security_groups(Filters=filters)["SecurityGroups"]

    def live_stacks(self, stack: str, region: str = REGION) -> list[dict[str, Any]]:
        """Stacks of that name that are not deleted (list_stacks also reports deleted ones)."""
        summaries = self.client("cloudformation", region).list_stacks()["StackSummaries"]
        return [
            summary
            for summary in summaries
            if summary["StackName"] == stack and summary["StackStatus"] != "DELETE_COMPLETE"
        ]


def tags(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}
