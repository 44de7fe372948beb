"""playbooks/provision.yml against the emulator: what it creates, and what it refuses to create."""

from __future__ import annotations

import pytest
import yaml
from aws_helpers import ADMIN_CIDR, CLIENT_CIDR, KEY_NAME, REPO, Aws, tags
from cfnlint.decode import cfn_yaml

pytestmark = pytest.mark.aws


def ingress_of(group: dict) -> set[tuple]:
    """(protocol, from, to, source) of every rule; the source is a CIDR or a group id."""
    rules = set()
    for rule in group["IpPermissions"]:
        assert not rule["Ipv6Ranges"], rule
        ports = (rule["IpProtocol"], rule["FromPort"], rule["ToPort"])
        rules |= {(*ports, ip_range["CidrIp"]) for ip_range in rule["IpRanges"]}
        rules |= {(*ports, pair["GroupId"]) for pair in rule["UserIdGroupPairs"]}
    return rules


def test_provision_creates_the_stack_with_every_host_locked_down(aws: Aws, stack: str) -> None:
    result = aws.provision(
        stack,
        "greeter_stack_instance_count=3",
        "greeter_stack_project=shop",
        "greeter_stack_environment=staging",
        "greeter_stack_metrics_port=9464",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # template_body, not the `template` parameter amazon.aws removes after 2026-05-01.
    assert "Param 'template' is deprecated" not in result.stdout + result.stderr

    instances = aws.instances(stack, "running")
    by_name = {tags(i)["Name"]: i for i in instances}
    assert sorted(by_name) == [f"{stack}-1", f"{stack}-2", f"{stack}-3", f"{stack}-lb"]
    for instance in instances:
        service = "greeter-lb" if tags(instance)["Name"] == f"{stack}-lb" else "greeter"
        assert (
            tags(instance).items()
            >= {"Project": "shop", "Environment": "staging", "Service": service}.items()
        )
        assert instance["InstanceType"] == "t3.micro"
        assert instance["KeyName"] == KEY_NAME
        assert tags(instance)["Access"] == "public"  # the inventory connects to the public IP
        # The image came from Canonical's 22.04 parameter as the emulator seeds it.
        assert instance["ImageId"] == "ami-785db401"

        (root,) = instance["BlockDeviceMappings"]
        assert root["Ebs"]["DeleteOnTermination"] is True
        (volume,) = aws.client("ec2").describe_volumes(VolumeIds=[root["Ebs"]["VolumeId"]])[
            "Volumes"
        ]
        assert (volume["VolumeType"], volume["Encrypted"]) == ("gp3", True)

    # Clients reach the balancer; the hosts' gRPC port opens only to the balancer's group and
    # the admin CIDR (the probe).
    groups = {tags(g)["Name"]: g for g in aws.security_groups(stack)}
    assert sorted(groups) == [f"{stack}-lb-sg", f"{stack}-sg"]
    hosts_group, balancer_group = groups[f"{stack}-sg"], groups[f"{stack}-lb-sg"]
    assert ingress_of(balancer_group) == {
        ("tcp", 22, 22, ADMIN_CIDR),
        ("tcp", 50051, 50051, CLIENT_CIDR),
    }
    assert ingress_of(hosts_group) == {
        ("tcp", 22, 22, ADMIN_CIDR),
        ("tcp", 50051, 50051, ADMIN_CIDR),
        ("tcp", 50051, 50051, balancer_group["GroupId"]),
        ("tcp", 9464, 9464, ADMIN_CIDR),  # metrics: the admin's network only
    }
    cloudformation = aws.client("cloudformation")
    (described,) = cloudformation.describe_stacks(StackName=stack)["Stacks"]
    assert described["StackStatus"] == "CREATE_COMPLETE"
    outputs = {output["OutputKey"]: output["OutputValue"] for output in described["Outputs"]}
    balancer = by_name[f"{stack}-lb"]
    expected = {
        "SecurityGroupId": hosts_group["GroupId"],
        "BalancerSecurityGroupId": balancer_group["GroupId"],
        "BalancerId": balancer["InstanceId"],
        "BalancerPublicIp": balancer["PublicIpAddress"],
        "BalancerPrivateIp": balancer["PrivateIpAddress"],
        "BalancerPublicDnsName": balancer["PublicDnsName"],
    }
    # One output per instance (CloudFormation's 200 outputs: stack.yaml's header).
    for index in (1, 2, 3):
        expected[f"Instance{index}PrivateIp"] = by_name[f"{stack}-{index}"]["PrivateIpAddress"]
    assert outputs == expected

    # moto drops MetadataOptions of AWS::EC2::Instance (describe_instances says HttpTokens
    # "optional"), so check the template the stack was really created from, as expanded.
    # The processed template is JSON, which botocore hands back parsed.
    processed = cloudformation.get_template(StackName=stack, TemplateStage="Processed")
    resources = processed["TemplateBody"]["Resources"]
    for resource in ("Instance1", "Instance2", "Instance3", "Balancer"):
        options = resources[resource]["Properties"]["MetadataOptions"]
        assert options["HttpTokens"] == "required"
        # moto does not attach the groups either: each instance names its own in the template
        # (on its network interface in a private subnet, tests/aws/test_private_subnet.py).
        group = "BalancerSecurityGroup" if resource == "Balancer" else "SecurityGroup"
        assert resources[resource]["Properties"]["SecurityGroupIds"] == {
            "Fn::If": ["IsPrivate", {"Ref": "AWS::NoValue"}, [{"Fn::GetAtt": [group, "GroupId"]}]]
        }


def test_without_the_balancer_clients_call_the_hosts_and_an_update_adds_it(
    aws: Aws, stack: str
) -> None:
    result = aws.provision(stack, "greeter_stack_instance_count=2", "greeter_stack_balancer=false")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(tags(i)["Name"] for i in aws.instances(stack, "running")) == [
        f"{stack}-1",
        f"{stack}-2",
    ]
    (group,) = aws.security_groups(stack)
    assert ingress_of(group) == {("tcp", 22, 22, ADMIN_CIDR), ("tcp", 50051, 50051, CLIENT_CIDR)}
    assert aws.inventory(stack).get("greeter_lb", {}).get("hosts", []) == []

    # Turned on later, with one more host: the stack gains both (the emulator follows the
    # Conditions on update as CloudFormation does), and the hosts open to the balancer.
    result = aws.provision(stack, "greeter_stack_instance_count=3")
    assert result.returncode == 0, result.stdout + result.stderr
    inventory = aws.inventory(stack)
    assert inventory["greeter_lb"]["hosts"] == [f"{stack}-lb"]
    assert sorted(inventory["greeter_servers"]["hosts"]) == [f"{stack}-{i}" for i in (1, 2, 3)]
    # (moto leaves an updated group's inline rules as they were; the rules with a balancer are
    # checked on a created stack above.)
    groups = {tags(g)["Name"]: g for g in aws.security_groups(stack)}
    assert ("tcp", 50051, 50051, groups[f"{stack}-lb-sg"]["GroupId"]) in ingress_of(
        groups[f"{stack}-sg"]
    )

    # And a host fewer: it leaves the stack and the inventory.
    result = aws.provision(stack, "greeter_stack_instance_count=2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(aws.inventory(stack)["greeter_servers"]["hosts"]) == [f"{stack}-1", f"{stack}-2"]


ADMIN = f"greeter_stack_admin_cidr={ADMIN_CIDR}"
KEY = f"greeter_stack_key_name={KEY_NAME}"
VPC = "greeter_stack_vpc_id=vpc-0123456789abcdef0"
SUBNET = "greeter_stack_subnet_id=subnet-0123456789abcdef0"


@pytest.mark.parametrize(
    ("extra_vars", "message"),
    [
        pytest.param([KEY], "greeter_stack_admin_cidr is required", id="admin-cidr-missing"),
        pytest.param([ADMIN], "greeter_stack_key_name is required", id="key-name-missing"),
        pytest.param(
            [ADMIN, "greeter_stack_key_name="], "greeter_stack_key_name is required", id="key-empty"
        ),
        pytest.param(
            [ADMIN, "greeter_stack_key_name=nobody-has-this"],
            'greeter_stack_key_name: region us-east-1 has no EC2 key pair "nobody-has-this"',
            id="key-pair-not-in-the-region",
        ),
        pytest.param(
            [KEY, "greeter_stack_admin_cidr=203.0.113.7"],
            "greeter_stack_admin_cidr: an IPv4 CIDR",
            id="admin-cidr-without-prefix",
        ),
        pytest.param(
            [KEY, "greeter_stack_admin_cidr=203.0.113.300/32"],
            "greeter_stack_admin_cidr: an IPv4 CIDR",
            id="admin-cidr-octet-too-big",
        ),
        pytest.param(
            [KEY, "greeter_stack_admin_cidr=0.0.0.0/0"],
            "SSH is never opened to the whole internet",
            id="ssh-open-to-the-world",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_instance_count=0"],
            "greeter_stack_instance_count: 1 to 194 instances (CloudFormation allows 200 outputs",
            id="count-0",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_instance_count=195", "greeter_stack_template_bucket=b-1"],
            "greeter_stack_instance_count: 1 to 194 instances (CloudFormation allows 200 outputs",
            id="count-195",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_instance_count=31"],
            "greeter_stack_instance_count: more than 30 instances need"
            " greeter_stack_template_bucket, an S3 bucket in the region",
            id="count-31-inline",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_template_bucket=Not_A_Bucket"],
            "greeter_stack_template_bucket: empty or an S3 bucket name",
            id="bad-bucket-name",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_instance_count=three"],
            "'greeter_stack_instance_count' is of type str and we were unable to convert to int",
            id="count-not-a-number",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_instance_type=t9.huge"],
            "value of greeter_stack_instance_type must be one of: t3.micro",
            id="unknown-instance-type",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_balancer=maybe"],
            "greeter_stack_balancer",
            id="balancer-not-a-bool",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_balancer_instance_type=t9.huge"],
            "value of greeter_stack_balancer_instance_type must be one of: t3.micro",
            id="unknown-balancer-instance-type",
        ),
        pytest.param(
            [ADMIN, KEY, SUBNET],
            "greeter_stack_vpc_id: set together with greeter_stack_subnet_id (now"
            ' "subnet-0123456789abcdef0"), both or neither',
            id="subnet-without-its-vpc",
        ),
        pytest.param(
            [ADMIN, KEY, VPC],
            'greeter_stack_vpc_id: set together with greeter_stack_subnet_id (now ""), both or'
            " neither",
            id="vpc-without-a-subnet",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_private_subnet=true"],
            "greeter_stack_private_subnet: true needs greeter_stack_vpc_id and"
            " greeter_stack_subnet_id",
            id="private-without-a-subnet",
        ),
        pytest.param(
            [ADMIN, KEY, "greeter_stack_metrics_port=50051"],
            "greeter_stack_metrics_port: 0 (closed) or a port from 1024 to 65535 other than",
            id="metrics-port-on-the-grpc-port",
        ),
    ],
)
def test_bad_parameters_fail_before_anything_is_created(
    aws: Aws, stack: str, extra_vars: list[str], message: str
) -> None:
    result = aws.playbook(stack, "provision.yml", "greeter_stack_wait_for_ssh=false", *extra_vars)

    output = result.stdout + result.stderr
    assert result.returncode == 2, output  # ansible-playbook: a task failed
    assert message in " ".join(output.split()), output  # messages may be wrapped
    assert "TASK [Create or update the stack]" not in output, "AWS must not be called"
    assert aws.live_stacks(stack) == []
    assert aws.instances(stack) == []
    assert aws.security_groups(stack) == []


def test_the_playbook_checks_what_the_template_allows() -> None:
    """provision.yml's choices and the defaults are the template's: neither can drift."""
    parameters = cfn_yaml.load(str(REPO / "stack.yaml"))["Parameters"]
    provision = yaml.safe_load((REPO / "playbooks" / "provision.yml").read_text())
    spec = provision[0]["tasks"][1]["ansible.builtin.validate_argument_spec"]["argument_spec"]
    assert (
        spec["greeter_stack_instance_type"]["choices"]
        == parameters["InstanceType"]["AllowedValues"]
        == spec["greeter_stack_balancer_instance_type"]["choices"]
        == parameters["BalancerInstanceType"]["AllowedValues"]
    )
    # The count's bounds: tests/aws/test_stack_template.py.
    defaults = yaml.safe_load((REPO / "inventory" / "group_vars" / "all" / "stack.yml").read_text())
    assert defaults["greeter_stack_instance_type"] == parameters["InstanceType"]["Default"]
    assert (
        defaults["greeter_stack_balancer_instance_type"]
        == parameters["BalancerInstanceType"]["Default"]
    )
    assert (
        str(defaults["greeter_stack_balancer"]).lower() == parameters["BalancerEnabled"]["Default"]
    )
    assert defaults["greeter_stack_grpc_port"] == parameters["GrpcPort"]["Default"]
    assert defaults["greeter_stack_metrics_port"] == parameters["MetricsPort"]["Default"] == 0
    assert defaults["greeter_stack_image_parameter"] == parameters["ImageId"]["Default"]
    assert defaults["greeter_stack_root_volume_size"] == parameters["RootVolumeSize"]["Default"]
    assert "greeter_stack_admin_cidr" not in defaults, "the admin CIDR must have no default"
    assert "Default" not in parameters["AdminCidr"]
    # A key pair is required, and CloudFormation checks it exists in the region as well.
    assert "greeter_stack_key_name" not in defaults, "the key pair must have no default"
    assert "Default" not in parameters["KeyName"]
    assert parameters["KeyName"]["Type"] == "AWS::EC2::KeyPair::KeyName"
    assert (
        str(defaults["greeter_stack_private_subnet"]).lower()
        == parameters["PrivateSubnet"]["Default"]
    )
