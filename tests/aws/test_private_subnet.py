"""greeter_stack_private_subnet: hosts without public IPs in the given subnet, and an inventory
that connects to their private IPs because the stack tags them so (no inventory edit)."""

from __future__ import annotations

import pytest
from aws_helpers import Aws, tags

pytestmark = pytest.mark.aws


def test_a_private_subnet_stack_is_reached_by_private_address(aws: Aws, stack: str) -> None:
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.30.1.0/24")["Subnet"]["SubnetId"]

    result = aws.provision(
        stack,
        "greeter_stack_instance_count=2",
        f"greeter_stack_vpc_id={vpc}",
        f"greeter_stack_subnet_id={subnet}",
        "greeter_stack_private_subnet=true",
    )

    assert result.returncode == 0, result.stdout + result.stderr
    by_name = {tags(i)["Name"]: i for i in aws.instances(stack, "running")}
    assert sorted(by_name) == [f"{stack}-1", f"{stack}-2", f"{stack}-lb"]
    for instance in by_name.values():
        assert "PublicIpAddress" not in instance
        assert instance["SubnetId"] == subnet
        assert tags(instance)["Access"] == "private"

    # The outputs hold the private addresses and no public one (there is none to give).
    (described,) = aws.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    outputs = {output["OutputKey"]: output["OutputValue"] for output in described["Outputs"]}
    assert not [key for key in outputs if "Public" in key], outputs
    assert outputs["Instance1PrivateIp"] == by_name[f"{stack}-1"]["PrivateIpAddress"]
    assert outputs["BalancerPrivateIp"] == by_name[f"{stack}-lb"]["PrivateIpAddress"]

    # Every instance's primary interface asks for no public address (whatever the subnet
    # would give) and carries the instance's groups; the emulator places it in that subnet.
    # As expanded (stack.yaml's Fn::ForEach): JSON, which botocore hands back parsed.
    processed = aws.client("cloudformation").get_template(
        StackName=stack, TemplateStage="Processed"
    )
    resources = processed["TemplateBody"]["Resources"]
    for resource in ("Instance1", "Instance2", "Balancer"):
        group = "BalancerSecurityGroup" if resource == "Balancer" else "SecurityGroup"
        (interface,) = resources[resource]["Properties"]["NetworkInterfaces"]["Fn::If"][1]
        assert interface == {
            "DeviceIndex": "0",
            "SubnetId": {"Ref": "SubnetId"},
            "AssociatePublicIpAddress": False,
            "GroupSet": [{"Fn::GetAtt": [group, "GroupId"]}],
        }

    hostvars = aws.inventory(stack)["_meta"]["hostvars"]
    assert sorted(hostvars) == sorted(by_name)
    for name, instance in by_name.items():
        assert hostvars[name]["ansible_host"] == instance["PrivateIpAddress"]
        assert hostvars[name]["greeter_backend_address"] == instance["PrivateIpAddress"]


def test_a_public_host_without_a_public_ip_is_an_inventory_error(aws: Aws, stack: str) -> None:
    """strict: a public-mode host that lacks a public IP fails the inventory, it is not listed
    without an address (moto gives a stack's instances in a subnet none)."""
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.31.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.31.1.0/24")["Subnet"]["SubnetId"]
    result = aws.provision(
        stack, f"greeter_stack_vpc_id={vpc}", f"greeter_stack_subnet_id={subnet}"
    )
    assert result.returncode != 0
    assert f"Could not set ansible_host for host {stack}-" in result.stderr, result.stderr[-3000:]
    assert "'ec2_public_ip_address' is undefined" in result.stderr
