"""``greeter probe --publish-stack`` against the emulator: what the table shows is what
CloudWatch holds, and a CloudWatch it cannot reach is exit 5, after the table."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from aws_helpers import Aws, free_loopback_port
from support.server import CLIENT, Server

pytestmark = pytest.mark.aws


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    server = Server("--workers", "1")
    yield server
    server.stop()


def probe(aws: Aws, stack: str, *targets: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLIENT, "probe", *targets, "--json", "--deadline", "3", "--publish-stack", stack],
        env=aws.env(stack, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_probe_publishes_healthy_hosts_and_each_hosts_latency(
    aws: Aws, stack: str, server: Server
) -> None:
    dead = f"127.0.0.1:{free_loopback_port()}"

    result = probe(aws, stack, server.target, dead)

    assert result.returncode == 4, result.stderr  # one host failed; published all the same
    rows = json.loads(result.stdout)
    assert [row["ok"] for row in rows] == [True, False]
    cloudwatch = aws.client("cloudwatch")
    now = datetime.now(timezone.utc)
    [point] = cloudwatch.get_metric_statistics(
        Namespace="Greeter",
        MetricName="HealthyHosts",
        Dimensions=[{"Name": "Stack", "Value": stack}],
        StartTime=now - timedelta(hours=1),
        EndTime=now + timedelta(minutes=5),
        Period=7200,
        Statistics=["SampleCount", "Maximum"],
    )["Datapoints"]
    assert (point["SampleCount"], point["Maximum"]) == (1.0, 1.0)
    [latency] = cloudwatch.list_metrics(Namespace="Greeter", MetricName="ProbeLatency")["Metrics"]
    assert sorted(latency["Dimensions"], key=lambda d: d["Name"]) == [
        {"Name": "Host", "Value": socket.gethostname()},  # the name the server reports
        {"Name": "Stack", "Value": stack},
    ]


def test_a_cloudwatch_it_cannot_reach_is_exit_5_after_the_table(
    aws: Aws, stack: str, server: Server
) -> None:
    nobody = f"http://127.0.0.1:{free_loopback_port()}"

    result = probe(aws, stack, server.target, AWS_ENDPOINT_URL=nobody)

    assert result.returncode == 5
    assert json.loads(result.stdout)[0]["ok"] is True
    assert "greeter: cannot publish to CloudWatch:" in result.stderr
