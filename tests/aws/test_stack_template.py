"""stack.yaml's Fn::ForEach, expanded as CloudFormation does (lab/stack_template.py, with
cfn-lint's private expander), and the fleet sizes CloudFormation's quotas leave, which
provision.yml enforces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aws_helpers import REPO
from support.aws_calls import expanded_template, resource_types

sys.path.insert(0, str(REPO / "lab"))
import stack_template  # lab/ is not a package: imported by path

pytestmark = pytest.mark.aws

TEMPLATE = stack_template.load(REPO / "stack.yaml")
FIXED_RESOURCES = [
    "SecurityGroup",
    "BalancerSecurityGroup",
    "BackendIngressFromBalancer",
    "Balancer",
    "MetricsIngress",
]
FIXED_OUTPUTS = [
    "SecurityGroupId",
    "BalancerSecurityGroupId",
    "BalancerId",
    "BalancerPrivateIp",
    "BalancerPublicIp",
    "BalancerPublicDnsName",
]
# CloudFormation's quotas, which apply to the processed template.
MAX_RESOURCES, MAX_OUTPUTS = 500, 200
MAX_INLINE_BYTES, MAX_S3_BYTES = 51_200, 1_048_576


def numbers(count: int) -> str:
    return ",".join(str(n) for n in range(1, count + 1))


def expand(count: int) -> dict:
    return stack_template.expand(TEMPLATE, {"InstanceNumbers": numbers(count)})


def processed_bytes(template: dict) -> int:
    """The processed template's size as compact JSON (CloudFormation keeps it as JSON)."""
    return len(json.dumps(template, separators=(",", ":")).encode())


def provision_vars() -> dict:
    return yaml.safe_load((REPO / "playbooks" / "provision.yml").read_text())[0]["vars"]


@pytest.mark.parametrize("count", [1, 3, 12, 100])
def test_the_expansion_writes_one_instance_and_one_output_per_number(count: int) -> None:
    expanded = expand(count)
    instances = [f"Instance{n}" for n in range(1, count + 1)]
    assert list(expanded["Resources"]) == FIXED_RESOURCES + instances
    assert list(expanded["Outputs"]) == FIXED_OUTPUTS + [f"{i}PrivateIp" for i in instances]
    assert "Transform" not in expanded
    for n, name in enumerate(instances, start=1):
        instance = expanded["Resources"][name]
        assert instance["Type"] == "AWS::EC2::Instance"
        assert "Condition" not in instance  # the loop decides, not a condition
        assert instance["Properties"]["Tags"] == [
            {"Key": "Name", "Value": {"Fn::Sub": f"${{AWS::StackName}}-{n}"}},
            {"Key": "Project", "Value": {"Ref": "Project"}},
            {"Key": "Environment", "Value": {"Ref": "Environment"}},
            {"Key": "Service", "Value": "greeter"},
            {"Key": "Access", "Value": {"Fn::If": ["IsPrivate", "private", "public"]}},
        ]
        # Every instance is the balancer's twin but for its tags and its group.
        balancer = expanded["Resources"]["Balancer"]["Properties"]
        same = {"ImageId", "KeyName", "MetadataOptions", "BlockDeviceMappings", "EbsOptimized"}
        assert {k: instance["Properties"][k] for k in same} == {k: balancer[k] for k in same}
        assert expanded["Outputs"][f"{name}PrivateIp"]["Value"] == {
            "Fn::GetAtt": [name, "PrivateIp"]
        }
    # The parameters stay as declared: the values go to the stack, not into its template.
    assert expanded["Parameters"]["InstanceNumbers"]["Default"] == "1"


def test_the_expansion_follows_the_numbers_it_is_given() -> None:
    expanded = stack_template.expand(TEMPLATE, {"InstanceNumbers": "2,5"})
    assert [r for r in expanded["Resources"] if r.startswith("Instance")] == [
        "Instance2",
        "Instance5",
    ]
    # No numbers passed: the Default, one instance.
    default = stack_template.expand(TEMPLATE)
    assert [r for r in default["Resources"] if r.startswith("Instance")] == ["Instance1"]


def test_an_empty_list_of_numbers_is_refused_not_made_up() -> None:
    # cfn-lint's expander invents random names for a collection it cannot resolve.
    with pytest.raises(ValueError, match="loops over parameter InstanceNumbers, which is empty"):
        stack_template.expand(TEMPLATE, {"InstanceNumbers": ""})


def test_a_template_without_the_transform_comes_back_as_it_is() -> None:
    plain = {"Resources": {"Topic": {"Type": "AWS::SNS::Topic"}}}
    assert stack_template.expand(plain, {"Anything": "1"}) == plain


def test_the_command_writes_the_expansion(tmp_path: Path) -> None:
    output = tmp_path / "expanded.json"
    result = subprocess.run(
        [
            sys.executable,
            REPO / "lab" / "stack_template.py",
            REPO / "stack.yaml",
            "InstanceNumbers=1,2",
            "--output",
            output,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(output.read_text()) == expand(2)


def test_the_iam_derivation_reads_the_resources_inside_the_loop(tmp_path: Path) -> None:
    assert {"Instance1", "Instance2"} <= set(expanded_template(REPO / "stack.yaml")["Resources"])
    only_a_loop = tmp_path / "loop.yaml"
    only_a_loop.write_text(
        "Transform: AWS::LanguageExtensions\n"
        "Parameters: {Names: {Type: CommaDelimitedList, Default: a}}\n"
        "Resources:\n"
        "  Fn::ForEach::Volumes:\n"
        "    - N\n"
        "    - !Ref Names\n"
        "    - Volume${N}: {Type: AWS::EC2::Volume, Properties: {Size: 1, AvailabilityZone: x}}\n"
    )
    assert resource_types(only_a_loop) == {"AWS::EC2::Volume"}


def test_provision_enforces_the_largest_fleet_cloudformation_takes() -> None:
    """Each bound is the largest count whose processed template fits, and one more does not."""
    limits = provision_vars()
    largest, inline = (
        limits["_greeter_stack_max_instances"],
        limits["_greeter_stack_max_instances_inline"],
    )

    # Outputs bind first: 6 and 1 per instance (the balancer on, public addresses).
    at_most, one_more = expand(largest), expand(largest + 1)
    assert len(at_most["Outputs"]) <= MAX_OUTPUTS < len(one_more["Outputs"])
    assert len(at_most["Resources"]) <= MAX_RESOURCES
    assert processed_bytes(at_most) <= MAX_S3_BYTES
    assert len(json.dumps(at_most, indent=2)) <= MAX_S3_BYTES  # even with whitespace

    # Inline, the template's size binds: about 1.3 KB per instance.
    assert processed_bytes(expand(inline)) <= MAX_INLINE_BYTES < processed_bytes(expand(inline + 1))
    assert inline >= 10, "the old template's ten instances must still go inline"
    assert largest >= 100
