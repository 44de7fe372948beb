"""A fleet too large for an inline template, through the real provision.yml on the emulator.

The smallest such fleet (31 instances) is enough to take the S3 path; the emulator's cost grows
with every instance (a 100-host create took 246 s here), and the expansion itself is checked up
to 194 hosts without it (test_stack_template.py); scaling in and out by the one variable is
test_provision.py's."""

from __future__ import annotations

import time

import pytest
from aws_helpers import REGION, Aws

pytestmark = pytest.mark.aws

# The smallest fleet whose processed template exceeds an inline body (provision.yml: > 30).
S3_FLEET = 31


def backends(aws: Aws, stack: str) -> list[str]:
    return sorted(aws.inventory(stack)["greeter_servers"]["hosts"])


def names(stack: str, count: int) -> list[str]:
    return sorted(f"{stack}-{n}" for n in range(1, count + 1))


def outputs(aws: Aws, stack: str) -> dict[str, str]:
    (described,) = aws.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    return {output["OutputKey"]: output["OutputValue"] for output in described["Outputs"]}


def test_a_fleet_above_30_goes_through_an_s3_template(aws: Aws, stack: str) -> None:
    bucket = f"{stack}-templates"
    aws.client("s3").create_bucket(Bucket=bucket)

    # Inline, CloudFormation would refuse the processed template: provision.yml says so first.
    refused = aws.provision(stack, f"greeter_stack_instance_count={S3_FLEET}")
    assert refused.returncode == 2, refused.stdout
    assert "more than 30 instances need greeter_stack_template_bucket" in " ".join(
        refused.stdout.split()
    )
    assert aws.live_stacks(stack) == []

    started = time.monotonic()
    result = aws.provision(
        stack, f"greeter_stack_instance_count={S3_FLEET}", f"greeter_stack_template_bucket={bucket}"
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    created = time.monotonic() - started
    assert backends(aws, stack) == names(stack, S3_FLEET)
    assert len(aws.instances(stack, "running")) == S3_FLEET + 1
    assert len(outputs(aws, stack)) == 6 + S3_FLEET
    # The stack was created from the uploaded template, the key named for the stack.
    body = aws.client("s3").get_object(Bucket=bucket, Key=f"{stack}/stack.yaml")["Body"].read()
    original = aws.client("cloudformation").get_template(StackName=stack)["TemplateBody"]
    assert body.decode() == original
    assert "Fn::ForEach::Instances" in original
    print(f"\n[fleet timing] {S3_FLEET} hosts created in {created:.1f} s ({REGION})")
