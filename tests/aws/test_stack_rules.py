"""stack.yaml's Rules, evaluated on parameter values: CloudFormation refuses a stack that breaks
one before it creates anything. The emulator ignores Rules, so a small evaluator of the rule
functions the template uses (Fn::Equals, Fn::And, Fn::Or, Fn::Not, Ref) reads them here.
(cfn-lint encodes Rules for its condition solver, cfnlint.conditions._rule, a private module
that answers "can this hold", not "does it hold for these values".)"""

from __future__ import annotations

from typing import Any

import pytest
from aws_helpers import REPO
from cfnlint.decode import cfn_yaml

pytestmark = pytest.mark.aws

VPC, SUBNET = "vpc-0123456789abcdef0", "subnet-0123456789abcdef0"


def evaluate(node: Any, parameters: dict[str, str]) -> Any:
    """The value of a rule expression for these parameter values."""
    if isinstance(node, dict):
        ((function, argument),) = node.items()
        if function == "Ref":
            return parameters[argument]
        values = [evaluate(item, parameters) for item in argument]
        if function == "Fn::Equals":
            return str(values[0]) == str(values[1])
        if function == "Fn::And":
            return all(values)
        if function == "Fn::Or":
            return any(values)
        if function == "Fn::Not":
            return not values[0]
        raise ValueError(f"the evaluator does not know {function}")
    return node


def broken_rules(**values: str) -> list[str]:
    """The AssertDescription of every assertion the values break, rule by rule."""
    template = cfn_yaml.load(str(REPO / "stack.yaml"))
    parameters = {name: str(p.get("Default", "")) for name, p in template["Parameters"].items()}
    parameters.update(values)
    broken = []
    for rule in template["Rules"].values():
        if "RuleCondition" in rule and not evaluate(rule["RuleCondition"], parameters):
            continue
        broken += [
            assertion["AssertDescription"]
            for assertion in rule["Assertions"]
            if not evaluate(assertion["Assert"], parameters)
        ]
    return broken


BOTH_OR_NEITHER = "VpcId and SubnetId come both or neither (the subnet must be in the VPC)"


@pytest.mark.parametrize(
    ("vpc", "subnet", "broken"),
    [
        pytest.param("", "", [], id="neither"),
        pytest.param(VPC, SUBNET, [], id="both"),
        pytest.param(VPC, "", [BOTH_OR_NEITHER], id="vpc-only"),
        pytest.param("", SUBNET, [BOTH_OR_NEITHER], id="subnet-only"),
    ],
)
def test_vpc_and_subnet_come_both_or_neither(vpc: str, subnet: str, broken: list[str]) -> None:
    assert broken_rules(VpcId=vpc, SubnetId=subnet) == broken


def test_a_private_subnet_must_be_given() -> None:
    needs = 'PrivateSubnet "true" needs VpcId and SubnetId (the default VPC\'s subnets are public)'
    assert broken_rules(PrivateSubnet="true") == [needs]
    assert broken_rules(PrivateSubnet="true", VpcId=VPC, SubnetId=SUBNET) == []
    assert broken_rules(PrivateSubnet="false") == []
