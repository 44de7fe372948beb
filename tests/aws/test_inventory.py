"""inventory/aws_ec2.yml against the emulator: exactly this stack's running hosts, or an error."""

from __future__ import annotations

from pathlib import Path

import pytest
from aws_helpers import BIN, Aws, free_loopback_port, tags

pytestmark = pytest.mark.aws


def test_inventory_lists_exactly_this_stacks_running_instances(aws: Aws, stack: str) -> None:
    other = f"{stack}-other"
    assert aws.provision(stack, "greeter_stack_instance_count=3").returncode == 0
    assert aws.provision(other, "greeter_stack_instance_count=1").returncode == 0
    by_name = {tags(i)["Name"]: i for i in aws.instances(stack)}
    stopped = by_name[f"{stack}-3"]["InstanceId"]
    aws.client("ec2").stop_instances(InstanceIds=[stopped])

    inventory = aws.inventory(stack)

    running = [f"{stack}-1", f"{stack}-2"]
    balancer = f"{stack}-lb"
    # The backends alone in greeter_servers, the balancer alone in greeter_lb.
    assert sorted(inventory["greeter_servers"]["hosts"]) == running
    assert inventory["greeter_lb"]["hosts"] == [balancer]
    for group in ("aws_ec2", "project_greeter", "env_dev", "aws_region_us_east_1"):
        assert sorted(inventory[group]["hosts"]) == [*running, balancer], group
    hostvars = inventory["_meta"]["hostvars"]
    assert sorted(hostvars) == [*running, balancer]  # no host of the other stack, none stopped
    for name in running:
        assert hostvars[name]["ansible_host"] == by_name[name]["PublicIpAddress"]
        assert hostvars[name]["ec2_instance_id"] == by_name[name]["InstanceId"]
        # The balancer reaches the backends by private address, inside the VPC.
        assert hostvars[name]["greeter_backend_address"] == by_name[name]["PrivateIpAddress"]
        assert hostvars[name]["ansible_user"] == "ubuntu"


def test_a_second_inventory_directory_adds_vars_to_the_aws_hosts(
    aws: Aws, stack: str, tmp_path: Path
) -> None:
    """The lab's contract: ANSIBLE_INVENTORY="inventory,<dir>" with group_vars and host_vars."""
    assert aws.provision(stack, "greeter_stack_instance_count=2").returncode == 0
    second = tmp_path / "inventory"
    (second / "group_vars").mkdir(parents=True)
    (second / "host_vars").mkdir()
    (second / "group_vars" / "all.yml").write_text("greeter_stack_environment: lab\n")
    (second / "host_vars" / f"{stack}-1.yml").write_text("ansible_host: 10.99.0.11\n")
    env = aws.env(stack, ANSIBLE_INVENTORY=f"{aws.env(stack)['ANSIBLE_INVENTORY']},{second}")

    # group_vars and host_vars alone are not an inventory: any_unparsed_is_failed stops the run.
    alone = aws.run(stack, str(BIN / "ansible-inventory"), "--list", env=env)
    assert alone.returncode != 0
    assert f"Completely failed to parse inventory source {second}" in alone.stderr

    (second / "hosts.yml").write_text("all: {}\n")
    hostvars = aws.inventory(stack, env=env)["_meta"]["hostvars"]
    assert hostvars[f"{stack}-1"]["ansible_host"] == "10.99.0.11"  # host_vars beat compose
    assert hostvars[f"{stack}-2"]["ansible_host"] != "10.99.0.11"
    assert {hostvars[name]["greeter_stack_environment"] for name in hostvars} == {"lab"}

    # The implicit localhost (where provision.yml runs) sees the second group_vars/all too,
    # and they win over the repository's defaults.
    shown = aws.on_localhost(
        stack, "env={{ greeter_stack_environment }} project={{ greeter_stack_project }}", env=env
    )
    assert "env=lab project=greeter" in shown


@pytest.mark.parametrize(
    "command",
    [
        ["ansible-inventory", "--list"],
        [
            "ansible-playbook",
            "playbooks/provision.yml",
            "-e",
            "greeter_stack_admin_cidr=203.0.113.7/32",
        ],
    ],
    ids=["ansible-inventory", "provision.yml"],
)
def test_an_unreachable_endpoint_is_an_error_not_an_empty_fleet(
    aws: Aws, stack: str, command: list[str]
) -> None:
    nobody = f"http://127.0.0.1:{free_loopback_port()}"
    program, *args = command

    result = aws.run(stack, str(BIN / program), *args, env=aws.env(stack, AWS_ENDPOINT_URL=nobody))

    assert result.returncode != 0, result.stdout
    # The cause is the last thing said before the final error, not another plugin's complaint
    # about the same file (ini's "Invalid host pattern '---'" used to come last).
    last = result.stderr.rsplit("Failed to parse inventory with", 1)[-1]
    assert f'Could not connect to the endpoint URL: "{nobody}/"' in last, result.stderr[-3000:]
    assert "Invalid host pattern" not in result.stderr, result.stderr[-3000:]
