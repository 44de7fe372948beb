"""On a lab of two hosts standing in for a staging stack: the deploy workflow's command
(.ci/deploy) deploys a tag and probes it; each deploy publishes one outcome message on the
stack's topic (read back through an SQS queue subscribed in the emulator); the probe workflow's
command (.ci/probe) publishes the healthy-hosts count its table showed, also with a host down.

The tests share the lab in file order, as an operator would: deploy, upgrade, a failed upgrade,
a rollback, then probes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support import emulator, watchdog
from support.lab import LabSession

pytestmark = pytest.mark.lab

LAB_NAME = "notices"
STACK = "staging"  # the stack the lab's hosts stand in for: hosts staging-1, staging-2
TAG = "v0.9.0-staging-test"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def aws(lab: LabSession, service: str) -> Any:
    return emulator.client(lab.env["AWS_ENDPOINT_URL"], service, lab.env["AWS_REGION"])


def clone(lab: LabSession, where: Path) -> Path:
    subprocess.run([*GIT, "clone", "--quiet", str(lab.git_mirror), str(where)], check=True)
    return where


def served_commits(lab: LabSession) -> dict[str, str]:
    targets = [f"{host.address}:50051" for host in lab.hosts]
    result = lab.run("greeter", "probe", *targets, "--json", check=False)
    return {row["hostname"] or row["target"]: row["commit"] for row in json.loads(result.stdout)}


def messages(queue: str, lab: LabSession) -> list[str]:
    """Every message waiting in the queue (removed as read)."""
    sqs, found = aws(lab, "sqs"), []
    while True:
        batch = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        if not batch.get("Messages"):
            return found
        for message in batch["Messages"]:
            found.append(message["Body"])
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])


def fields(message: str) -> dict[str, str]:
    """The message's "key: value" lines; `releases` is the release directories switched to
    (a commit, or a commit with a configuration suffix), here cut to the commit."""
    found = dict(line.split(": ", 1) for line in message.splitlines() if ": " in line)
    found["releases"] = ", ".join(r[:40] for r in found["releases"].split(", "))
    found.pop("hosts failed")  # which host Ansible marks failed is the deploy plays' choice
    return found


def healthy_hosts(lab: LabSession) -> dict[str, float]:
    """Every HealthyHosts datum of the stack so far, as one statistic set."""
    now = datetime.now(timezone.utc)
    points = (
        aws(lab, "cloudwatch")
        .get_metric_statistics(
            Namespace="Greeter",
            MetricName="HealthyHosts",
            Dimensions=[{"Name": "Stack", "Value": STACK}],
            StartTime=now - timedelta(hours=1),
            EndTime=now + timedelta(minutes=5),
            Period=7200,
            Statistics=["SampleCount", "Minimum", "Maximum"],
        )
        .get("Datapoints", [])
    )
    assert len(points) <= 1
    return {key: points[0][key] for key in ("SampleCount", "Minimum", "Maximum")} if points else {}


def table_ok_column(output: str) -> list[str]:
    """The OK column of the probe table that probe.yml printed, one entry per host."""
    return re.findall(r"\d+\.\d+\.\d+\.\d+:\d+\s+(yes|NO)\s", output)


@pytest.fixture(scope="module")
def staging(extra_lab: Callable[[str, int], LabSession]) -> Iterator[LabSession]:
    """Two fresh lab hosts for the stack `staging`, created in the lab's emulator."""
    before = os.environ.get("GREETER_STACK_NAME")
    os.environ["GREETER_STACK_NAME"] = STACK  # read by `lab/lab up`
    try:
        lab = extra_lab(LAB_NAME, 2)
    finally:
        if before is None:
            del os.environ["GREETER_STACK_NAME"]
        else:
            os.environ["GREETER_STACK_NAME"] = before
    assert [host.name for host in lab.hosts] == ["staging-1", "staging-2"]
    assert lab.env["GREETER_STACK_NAME"] == STACK
    lab.playbook("playbooks/provision.yml")
    yield lab


@pytest.fixture(scope="module")
def queue(staging: LabSession) -> str:
    """An SQS queue subscribed to the stack's topic (which the first site.yml created)."""
    sqs, sns = aws(staging, "sqs"), aws(staging, "sns")
    url = sqs.create_queue(QueueName=f"{STACK}-events-test")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]
    topic = f"arn:aws:sns:{staging.env['AWS_REGION']}:123456789012:{STACK}-events"
    sns.subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=arn["QueueArn"],
        Attributes={"RawMessageDelivery": "true"},
    )
    return url


def test_the_deploy_job_deploys_a_tag_to_the_staging_stack_and_probes_it(
    staging: LabSession, tmp_path: Path
) -> None:
    # The workflow's checkout: a clone that has the tag, pushed where the hosts fetch from.
    checkout = clone(staging, tmp_path / "checkout")
    subprocess.run([*GIT, "-C", str(checkout), "tag", TAG], check=True)
    subprocess.run([*GIT, "-C", str(checkout), "push", "--quiet", "origin", TAG], check=True)
    tagged = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", f"{TAG}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()

    # The key as the workflow hands it over: the secret's text, not a file.
    env = {key: value for key, value in staging.env.items() if key != "ANSIBLE_PRIVATE_KEY_FILE"}
    env["SSH_PRIVATE_KEY"] = Path(staging.env["ANSIBLE_PRIVATE_KEY_FILE"]).read_text()
    started = time.monotonic()
    result = watchdog.run([checkout / ".ci" / "deploy", TAG], 1800, cwd=checkout, env=env)
    print(f"\n[notices timing] .ci/deploy of 2 hosts: {time.monotonic() - started:.1f} s")

    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert f".ci/deploy: {TAG} ({tagged}) to stack {STACK}" in result.stdout
    assert table_ok_column(result.stdout.rsplit("PLAY [Probe the fleet]", 1)[-1]) == ["yes"] * 2
    assert served_commits(staging) == {"staging-1": tagged, "staging-2": tagged}


def test_the_deploy_job_refuses_a_tag_the_checkout_lacks(staging: LabSession) -> None:
    result = staging.run(".ci/deploy", "v0.0.0-no-such-tag", check=False)
    assert result.returncode == 2
    assert "no tag v0.0.0-no-such-tag in this checkout; nothing was deployed" in result.stderr


def test_a_deploy_that_succeeds_publishes_one_message(
    staging: LabSession, queue: str, tmp_path: Path
) -> None:
    new = staging.push_commit(tmp_path, "A new release")

    staging.playbook("playbooks/deploy.yml", "-e", f"greeter_version={new}")

    [message] = messages(queue, staging)
    assert fields(message) == {
        "stack": STACK,
        "action": "deploy",
        "version": new,
        "releases": new,
        "outcome": "succeeded",
        "hosts switched": "staging-1, staging-2",
        "hosts rolled back": "none",
    }


def test_a_deploy_whose_gate_fails_publishes_one_message_failed_and_rolled_back(
    staging: LabSession, queue: str, tmp_path: Path
) -> None:
    before = served_commits(staging)

    def break_server(work: Path) -> None:
        server = work / "service" / "src" / "greeter" / "server.py"
        server.write_text(
            server.read_text() + "\n\ndef main(argv=None):  # a deliberately broken release\n"
            "    raise SystemExit('this release refuses to start')\n"
        )

    bad = staging.push_commit(tmp_path, "Break the server", break_server)
    result = staging.playbook(
        "playbooks/deploy.yml",
        "-e",
        f"greeter_version={bad}",
        "-e",
        "greeter_verify_timeout=5",
        check=False,
    )

    assert result.returncode != 0
    [message] = messages(queue, staging)
    assert fields(message) == {
        "stack": STACK,
        "action": "deploy",
        "version": bad,
        "releases": "-",
        "outcome": "failed and rolled back",
        "hosts switched": "none",
        "hosts rolled back": "staging-1",
    }
    assert served_commits(staging) == before


def test_a_rollback_publishes_one_message(staging: LabSession, queue: str) -> None:
    tagged = served_commits(staging)
    upgraded = set(tagged.values())
    staging.playbook("playbooks/rollback.yml")

    [message] = messages(queue, staging)
    back = served_commits(staging)
    assert set(back.values()) != upgraded
    assert fields(message) == {
        "stack": STACK,
        "action": "rollback",
        "version": "previous",
        "releases": back["staging-1"],
        "outcome": "succeeded",
        "hosts switched": "staging-1, staging-2",
        "hosts rolled back": "none",
    }


def test_the_probe_job_publishes_the_healthy_hosts_its_table_showed(staging: LabSession) -> None:
    assert healthy_hosts(staging) == {}  # nothing published before

    both = staging.run(".ci/probe")
    assert table_ok_column(both.stdout) == ["yes", "yes"]
    assert healthy_hosts(staging) == {"SampleCount": 1.0, "Minimum": 2.0, "Maximum": 2.0}

    staging.ssh(staging.hosts[1], "sudo systemctl stop greeter.service")
    try:
        one = staging.run(".ci/probe", check=False)
    finally:
        staging.ssh(staging.hosts[1], "sudo systemctl start greeter.service")

    assert one.returncode != 0  # the probe fails the run; it published first
    assert sorted(table_ok_column(one.stdout)) == ["NO", "yes"]
    assert healthy_hosts(staging) == {"SampleCount": 2.0, "Minimum": 1.0, "Maximum": 2.0}
    cloudwatch = aws(staging, "cloudwatch")
    latency = cloudwatch.list_metrics(Namespace="Greeter", MetricName="ProbeLatency")["Metrics"]
    hosts = sorted({d["Value"] for m in latency for d in m["Dimensions"] if d["Name"] == "Host"})
    assert hosts == ["staging-1", "staging-2"]
