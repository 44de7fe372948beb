"""Fleets beyond the old ten hosts, through the real provision.yml on the emulator: one
variable, greeter_stack_instance_count, scales the stack (Fn::ForEach) in and out, and the
inventory follows."""

from __future__ import annotations

import time

import pytest
from aws_helpers import REGION, Aws, tags

pytestmark = pytest.mark.aws


def backends(aws: Aws, stack: str) -> list[str]:
    return sorted(aws.inventory(stack)["greeter_servers"]["hosts"])


def names(stack: str, count: int) -> list[str]:
    return sorted(f"{stack}-{n}" for n in range(1, count + 1))


def outputs(aws: Aws, stack: str) -> dict[str, str]:
    (described,) = aws.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    return {output["OutputKey"]: output["OutputValue"] for output in described["Outputs"]}


def test_a_fleet_of_12_scales_in_to_5_and_out_again(aws: Aws, stack: str) -> None:
    started = time.monotonic()
    result = aws.provision(stack, "greeter_stack_instance_count=12")
    assert result.returncode == 0, result.stdout + result.stderr
    created = time.monotonic() - started
    assert backends(aws, stack) == names(stack, 12)
    assert aws.inventory(stack)["greeter_lb"]["hosts"] == [f"{stack}-lb"]
    running = {tags(i)["Name"]: i for i in aws.instances(stack, "running")}
    assert len(running) == 13
    for n in range(1, 13):
        assert tags(running[f"{stack}-{n}"])["Service"] == "greeter"
        assert (
            outputs(aws, stack)[f"Instance{n}PrivateIp"]
            == running[f"{stack}-{n}"]["PrivateIpAddress"]
        )
    kept = {name: running[name]["InstanceId"] for name in names(stack, 5)}

    # In: the highest numbers go, the rest stay as they are.
    result = aws.provision(stack, "greeter_stack_instance_count=5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert backends(aws, stack) == names(stack, 5)
    after = {tags(i)["Name"]: i["InstanceId"] for i in aws.instances(stack, "running")}
    assert {name: after[name] for name in names(stack, 5)} == kept
    gone = [i for i in aws.instances(stack) if i["State"]["Name"] != "running"]
    assert sorted(tags(i)["Name"] for i in gone) == sorted(f"{stack}-{n}" for n in range(6, 13))
    assert "Instance6PrivateIp" not in outputs(aws, stack)

    # Out again: new instances 6..12, tagged for the inventory like those of the first create.
    result = aws.provision(stack, "greeter_stack_instance_count=12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert backends(aws, stack) == names(stack, 12)
    assert "Instance12PrivateIp" in outputs(aws, stack)
    # A rerun with the same count changes nothing.
    result = aws.provision(stack, "greeter_stack_instance_count=12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TASK [Create or update the stack]" in result.stdout
    assert "changed=0" in result.stdout.rsplit("PLAY RECAP", 1)[1]
    print(f"\n[fleet timing] 12 hosts created in {created:.1f} s")


def test_a_fleet_of_100_goes_through_an_s3_template(aws: Aws, stack: str) -> None:
    bucket = f"{stack}-templates"
    aws.client("s3").create_bucket(Bucket=bucket)

    # Inline, CloudFormation would refuse the processed template: provision.yml says so first.
    refused = aws.provision(stack, "greeter_stack_instance_count=100")
    assert refused.returncode == 2, refused.stdout
    assert "more than 30 instances need greeter_stack_template_bucket" in " ".join(
        refused.stdout.split()
    )
    assert aws.live_stacks(stack) == []

    started = time.monotonic()
    result = aws.provision(
        stack, "greeter_stack_instance_count=100", f"greeter_stack_template_bucket={bucket}"
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    created = time.monotonic() - started
    assert backends(aws, stack) == names(stack, 100)
    assert len(aws.instances(stack, "running")) == 101
    assert len(outputs(aws, stack)) == 6 + 100
    # The stack was created from the uploaded template, the key named for the stack.
    body = aws.client("s3").get_object(Bucket=bucket, Key=f"{stack}/stack.yaml")["Body"].read()
    original = aws.client("cloudformation").get_template(StackName=stack)["TemplateBody"]
    assert body.decode() == original
    assert "Fn::ForEach::Instances" in original
    print(f"\n[fleet timing] 100 hosts created in {created:.1f} s ({REGION})")
