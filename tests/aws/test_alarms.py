"""playbooks/alarms.yml and teardown.yml against the emulator: the topic, three alarms per
running instance (the backends and the balancer) read back from CloudWatch, the fleet alarm,
following the fleet, idempotence, bad input, and nothing left after teardown."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

import pytest
from aws_helpers import REGION, REPO, Aws, tags
from support.ansible import recap
from support.aws_calls import load_policy

pytestmark = pytest.mark.aws

ACCOUNT = "123456789012"  # moto's account
DIFF = {"ANSIBLE_DIFF_ALWAYS": "true"}  # --diff


def alarms(aws: Aws, stack: str) -> dict[str, dict[str, Any]]:
    pages = aws.client("cloudwatch").get_paginator("describe_alarms")
    return {
        alarm["AlarmName"]: alarm
        for page in pages.paginate(AlarmNamePrefix=f"{stack}/")
        for alarm in page["MetricAlarms"]
    }


def put_times(aws: Aws, stack: str) -> dict[str, object]:
    """When each alarm was last put (PutMetricAlarm sets it; a read does not)."""
    return {
        name: alarm["AlarmConfigurationUpdatedTimestamp"]
        for name, alarm in alarms(aws, stack).items()
    }


def topics(aws: Aws, stack: str) -> list[str]:
    arns = [t["TopicArn"] for t in aws.client("sns").list_topics()["Topics"]]
    return [arn for arn in arns if arn.endswith(f":{stack}-events")]


def run_alarms(aws: Aws, stack: str, *extra_vars: str) -> dict[str, int]:
    result = aws.playbook(stack, "alarms.yml", *extra_vars)
    assert result.returncode == 0, result.stdout + result.stderr
    return recap(result.stdout)["localhost"]


def instance_ids(aws: Aws, stack: str) -> dict[str, str]:
    """The running instances' ids by name: the backends and the balancer, all watched alike."""
    return {tags(i)["Name"]: i["InstanceId"] for i in aws.instances(stack, "running")}


def expected_instance_alarms(
    stack: str,
    ids: dict[str, str],
    topic: str,
    cpu: tuple[float, int, int] = (80.0, 300, 3),
    status_periods: int = 2,
) -> dict[str, dict]:
    """name -> the fields CloudWatch must hold; defaults: group_vars/all/alarms.yml's."""
    wanted = {}
    for host, instance in ids.items():
        status = {
            "Namespace": "AWS/EC2",
            "Statistic": "Maximum",
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "Threshold": 1.0,
            "Period": 60,
            "EvaluationPeriods": status_periods,
            "Dimensions": [{"Name": "InstanceId", "Value": instance}],
        }
        wanted[f"{stack}/{host}/system-status"] = status | {
            "MetricName": "StatusCheckFailed_System",
            "AlarmActions": [f"arn:aws:automate:{REGION}:ec2:recover", topic],
        }
        wanted[f"{stack}/{host}/instance-status"] = status | {
            "MetricName": "StatusCheckFailed_Instance",
            "AlarmActions": [f"arn:aws:automate:{REGION}:ec2:reboot", topic],
        }
        wanted[f"{stack}/{host}/cpu"] = {
            "MetricName": "CPUUtilization",
            "Namespace": "AWS/EC2",
            "Statistic": "Average",
            "ComparisonOperator": "GreaterThanThreshold",
            "Threshold": cpu[0],
            "Period": cpu[1],
            "EvaluationPeriods": cpu[2],
            "Dimensions": [{"Name": "InstanceId", "Value": instance}],
            "AlarmActions": [topic],
        }
    return wanted


def assert_alarms(found: dict[str, dict], wanted: dict[str, dict]) -> None:
    assert sorted(found) == sorted(wanted)
    for name, fields in wanted.items():
        assert {key: found[name][key] for key in fields} == fields, name


def assert_fit_the_policies(stack: str, found: dict[str, dict]) -> None:
    """Every alarm's actions are ones the operator and CI policies let PutMetricAlarm set (their
    condition on cloudwatch:AlarmActions, which neither the emulator nor the IAM test's recorder
    evaluates). The policies name stacks greeter*; the tests' stacks are named otherwise."""
    for name in ("operator-policy.json", "ci-deploy-policy.json"):
        [statement] = [
            s
            for s in load_policy(REPO / "iam" / name)["Statement"]
            if s["Action"] == "cloudwatch:PutMetricAlarm"
        ]
        allowed = [
            pattern.replace("ACCOUNT_ID", ACCOUNT).replace("greeter*", f"{stack}*")
            for pattern in statement["Condition"]["ForAllValues:StringLike"][
                "cloudwatch:AlarmActions"
            ]
        ]
        for alarm in found.values():
            for action in alarm["AlarmActions"]:
                assert any(fnmatchcase(action, p) for p in allowed), (name, alarm["AlarmName"])


def add_instance(aws: Aws, stack: str, name: str, service: str = "greeter") -> str:
    """An instance the aws_ec2 inventory counts as the stack's (what a stack update would add):
    a backend, or with service="greeter-lb" the balancer.

    moto's stack updates are unreliable (see the emulator notes), so the instance is started
    directly with the tags CloudFormation puts on the stack's instances.
    """
    image = aws.instances(stack)[0]["ImageId"]
    reservation = aws.client("ec2").run_instances(
        ImageId=image,
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "aws:cloudformation:stack-name", "Value": stack},
                    {"Key": "Name", "Value": name},
                    {"Key": "Service", "Value": service},
                    {"Key": "Project", "Value": "greeter"},
                    {"Key": "Environment", "Value": "dev"},
                ],
            }
        ],
    )
    return reservation["Instances"][0]["InstanceId"]


FLEET_ALARM_FIELDS = (
    "Namespace",
    "MetricName",
    "Dimensions",
    "Statistic",
    "ComparisonOperator",
    "Threshold",
    "Period",
    "EvaluationPeriods",
    "TreatMissingData",
    "AlarmActions",
)


def test_alarms_watch_every_instance_the_balancer_too_a_rerun_changes_nothing_teardown_removes_all(
    aws: Aws, stack: str
) -> None:
    assert aws.provision(stack, "greeter_stack_instance_count=3").returncode == 0
    settings = ("greeter_alarms_email=ops@example.com", "greeter_probe_publish=true")

    first = run_alarms(aws, stack, *settings)

    [topic] = topics(aws, stack)
    assert topic == f"arn:aws:sns:{REGION}:{ACCOUNT}:{stack}-events"
    subscriptions = aws.client("sns").list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions] == [("email", "ops@example.com")]
    ids = instance_ids(aws, stack)
    balancer = f"{stack}-lb"
    assert sorted(ids) == [f"{stack}-1", f"{stack}-2", f"{stack}-3", balancer]
    found = alarms(aws, stack)
    assert_fit_the_policies(stack, found)
    fleet = found.pop(f"{stack}/fleet/healthy-hosts")
    assert_alarms(found, expected_instance_alarms(stack, ids, topic))
    # The front door is watched like a backend: recovered, rebooted, its CPU on the topic.
    assert {
        name.removeprefix(f"{stack}/{balancer}/"): (alarm["Dimensions"], alarm["AlarmActions"])
        for name, alarm in found.items()
        if name.startswith(f"{stack}/{balancer}/")
    } == {
        "system-status": (
            [{"Name": "InstanceId", "Value": ids[balancer]}],
            [f"arn:aws:automate:{REGION}:ec2:recover", topic],
        ),
        "instance-status": (
            [{"Name": "InstanceId", "Value": ids[balancer]}],
            [f"arn:aws:automate:{REGION}:ec2:reboot", topic],
        ),
        "cpu": ([{"Name": "InstanceId", "Value": ids[balancer]}], [topic]),
    }
    assert {key: fleet[key] for key in FLEET_ALARM_FIELDS} == {
        "Namespace": "Greeter",
        "MetricName": "HealthyHosts",
        "Dimensions": [{"Name": "Stack", "Value": stack}],
        "Statistic": "Minimum",
        "ComparisonOperator": "LessThanThreshold",
        "Threshold": 3.0,  # the number of backends: the balancer is not one
        "Period": 600,
        "EvaluationPeriods": 2,
        "TreatMissingData": "breaching",  # the probe stopped publishing
        "AlarmActions": [topic],
    }
    assert first["changed"] == 2  # the topic, the alarms (one task: the instances' and the fleet's)

    before = put_times(aws, stack)
    rerun = aws.playbook(stack, "alarms.yml", *settings)
    again = recap(rerun.stdout)["localhost"]
    assert (again["changed"], again["failed"]) == (0, 0)
    # Alarms already in place are not put again: the rerun is one read.
    assert put_times(aws, stack) == before

    result = aws.playbook(stack, "teardown.yml", "greeter_teardown_confirm=true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert alarms(aws, stack) == {}
    assert topics(aws, stack) == []
    assert aws.live_stacks(stack) == []


def test_alarms_follow_the_fleet_the_inventory_lists_the_balancer_included_and_the_variables(
    aws: Aws, stack: str
) -> None:
    no_balancer = ("greeter_stack_instance_count=3", "greeter_stack_balancer=false")
    assert aws.provision(stack, *no_balancer).returncode == 0
    run_alarms(aws, stack, "greeter_probe_publish=true")
    [topic] = topics(aws, stack)
    ids = instance_ids(aws, stack)
    assert sorted(ids) == [f"{stack}-1", f"{stack}-2", f"{stack}-3"]  # no balancer, no alarm of one
    fleet = f"{stack}/fleet/healthy-hosts"
    assert sorted(alarms(aws, stack)) == sorted(
        [*expected_instance_alarms(stack, ids, topic), fleet]
    )

    # A host and a balancer arrive, a host goes, and the variables change.
    fourth = add_instance(aws, stack, f"{stack}-4")
    balancer = add_instance(aws, stack, f"{stack}-lb", service="greeter-lb")
    aws.client("ec2").terminate_instances(InstanceIds=[ids[f"{stack}-2"]])
    settings = (
        "greeter_alarms_cpu_threshold=65.5",
        "greeter_alarms_cpu_periods=4",
        "greeter_alarms_cpu_period=60",
        "greeter_alarms_status_periods=5",
        "greeter_probe_publish=false",
    )
    changes = run_alarms(aws, stack, *settings)

    ids = instance_ids(aws, stack)
    assert sorted(ids) == [f"{stack}-1", f"{stack}-3", f"{stack}-4", f"{stack}-lb"]
    assert (ids[f"{stack}-4"], ids[f"{stack}-lb"]) == (fourth, balancer)
    wanted = expected_instance_alarms(stack, ids, topic, cpu=(65.5, 60, 4), status_periods=5)
    assert_alarms(alarms(aws, stack), wanted)  # no fleet alarm without publishing
    assert changes["changed"] == 1  # one task: alarms created, updated, the gone host's deleted

    # The balancer goes (greeter_stack_balancer turned off): its alarms go, nothing else changes.
    aws.client("ec2").terminate_instances(InstanceIds=[balancer])
    before = put_times(aws, stack)
    rerun = aws.playbook(stack, "alarms.yml", *settings, env=aws.env(stack) | DIFF)

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert recap(rerun.stdout)["localhost"]["changed"] == 1  # the deletion only
    kept = {name: time for name, time in before.items() if f"/{stack}-lb/" not in name}
    assert put_times(aws, stack) == kept  # the others were not put again
    assert sorted(re.findall(rf"^-({re.escape(stack)}/\S+)$", rerun.stdout, re.M)) == sorted(
        set(before) - set(kept)
    )  # --diff names the deleted alarms
    del ids[f"{stack}-lb"]
    wanted = expected_instance_alarms(stack, ids, topic, cpu=(65.5, 60, 4), status_periods=5)
    assert_alarms(alarms(aws, stack), wanted)


def test_bad_values_fail_before_any_aws_call_each_with_its_own_message(
    aws: Aws, stack: str
) -> None:
    result = aws.playbook(
        stack,
        "alarms.yml",
        "greeter_alarms_cpu_threshold=120",
        "greeter_alarms_cpu_periods=0",
        "greeter_alarms_cpu_period=120",
        "greeter_alarms_status_periods=61",
        "greeter_alarms_fleet_period=90",
        "greeter_alarms_email=not-an-address",
    )

    assert result.returncode == 2
    output = " ".join((result.stdout + result.stderr).split())
    for message in (
        'greeter_alarms_cpu_threshold: a percentage above 0 and at most 100 (got "120")',
        'greeter_alarms_cpu_periods: 1 to 100 periods (got "0")',
        "greeter_alarms_cpu_period: 60 or 300 seconds",
        'greeter_alarms_status_periods: 1 to 60 one-minute checks (got "61")',
        'greeter_alarms_fleet_period: 60 to 3600 seconds, a multiple of 60 (got "90")',
        "greeter_alarms_email: empty or one e-mail address such as ops@example.com",
    ):
        assert message in output
    assert "Nothing was changed." in output
    assert "Create the stack's topic" not in output
    assert topics(aws, stack) == []


def test_a_wrongly_typed_variable_fails_before_any_aws_call(aws: Aws, stack: str) -> None:
    result = aws.playbook(stack, "alarms.yml", "greeter_alarms_cpu_periods=three")

    assert result.returncode == 2
    assert "greeter_alarms_cpu_periods" in result.stdout
    assert "Create the stack's topic" not in result.stdout
    assert topics(aws, stack) == []
