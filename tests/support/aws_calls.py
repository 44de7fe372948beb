"""Which AWS API calls a command really made, and whether an IAM policy allows exactly those.

The recorder side drives moto's request recorder (``/moto-api/recorder/...``) on the emulator
(lab/emulator.py) and turns its download, one JSON line per request, into IAM action names
(``ec2:DescribeInstances``) with the access key id that signed each request: give every caller
under test its own access key id (moto accepts any) and the union per key id is what that
caller needs. The lab's launcher polls the emulator with ``testing``, so leave that one out.

The policy side reads IAM policy documents (iam/*.json): ``policy_allows`` (does an Allow
statement name the action, with IAM's wildcards and IAM's case-insensitivity),
``unused_actions`` (entries nothing called) and ``check_policy`` (both directions, with the
exemptions IAM_ONLY_ACTIONS lists: permissions AWS checks without the caller making the call).
Resources and conditions are not evaluated: the emulator does not enforce IAM, so a recording
proves which actions run, not that a resource ARN matches; iam/README.md says how the resource
scoping was chosen.

``cloudformation_permissions`` derives what CloudFormation itself needs for a template's
resource types from the resource provider schemas cfn-lint bundles
(``handlers.{create,read,update,delete}.permissions``): those calls are made by CloudFormation,
under the stack's service role, and never appear in a recording of our tools.
"""

from __future__ import annotations

import base64
import fnmatch
import importlib
import json
import re
import sys
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# The SigV4 signing name (the credential scope's service) where it differs from the IAM
# action prefix. The rest of the services this project calls sign with their IAM prefix.
IAM_PREFIX_OF_SIGNING_NAME = {
    "monitoring": "cloudwatch",
    "email": "ses",
}

# Permissions AWS checks for a call without the caller ever making a call of that name, so no
# recording can show them; check_policy does not report them as unused. Each says why.
IAM_ONLY_ACTIONS = {
    "iam:PassRole": (
        "checked when provision.yml hands CloudFormation the stack's service role "
        "(amazon.aws.cloudformation role_arn = greeter_stack_role_arn); not an API call"
    ),
    "iam:CreateServiceLinkedRole": (
        "checked by PutMetricAlarm for an alarm with EC2 actions (alarms.yml's recover and "
        "reboot) the first time the account needs AWSServiceRoleForCloudWatchEvents; "
        "CloudWatch creates that role itself"
    ),
    "kms:Decrypt": (
        "checked by SSM and Secrets Manager when greeter_extra_env_from reads a SecureString or a "
        "secret encrypted with a customer managed key (kms:ViaService): they decrypt, the caller "
        "makes no KMS call"
    ),
}

# Actions a policy must hold for a feature the recorded commands may leave off: no recording of
# a run without it can show them, so check_policy does not report them unused by default. The
# test named records them.
FEATURE_ACTIONS = {
    "secretsmanager:GetSecretValue": (
        "greeter_extra_env_from's Secrets Manager references, read by a deploy that names one "
        "(tests/aws/test_iam.py::test_greeter_extra_env_from_reads_two_actions_both_deployers_hold)"
    ),
}

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]+/([^/]+)/([^/]+)/aws4_request")
_RPC_V2_PATH = re.compile(r"^/service/[^/]+/operation/([^/?]+)")


@dataclass(frozen=True, order=True)
class Call:
    """One signed request: who signed it and the IAM action it needs."""

    access_key_id: str
    region: str
    action: str  # service:Operation, or service:?METHOD /path when the protocol names none


class AwsCallRecorder:
    """moto's request recorder on the emulator at ``endpoint`` (http://127.0.0.1:PORT).

    The recorder is one per emulator: reset and stop act for everyone recording there, so run
    one recording at a time per emulator and tell callers apart by access key id.
    """

    def __init__(self, endpoint: str, timeout: float = 30) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout

    def _request(self, verb: str, method: str = "POST") -> str:
        url = f"{self.endpoint}/moto-api/recorder/{verb}"
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an HTTP endpoint: {self.endpoint!r}")
        data = b"" if method == "POST" else None
        request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 - checked
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
            return response.read().decode()

    def start(self) -> None:
        self._request("start-recording")

    def stop(self) -> None:
        self._request("stop-recording")

    def reset(self) -> None:
        self._request("reset-recording")

    def download(self) -> str:
        return self._request("download-recording", method="GET")

    def calls(self) -> list[Call]:
        return parse_recording(self.download())

    def actions(self, access_key_id: str | None = None) -> set[str]:
        """The IAM actions called, by one access key id or by all."""
        return actions_of(self.calls(), access_key_id)

    @contextmanager
    def recording(self) -> Iterator[AwsCallRecorder]:
        """Record only what runs inside the block (earlier requests are forgotten)."""
        self.reset()
        self.start()
        try:
            yield self
        finally:
            self.stop()


def actions_of(calls: Iterable[Call], access_key_id: str | None = None) -> set[str]:
    return {c.action for c in calls if access_key_id is None or c.access_key_id == access_key_id}


def parse_recording(text: str) -> list[Call]:
    """Every signed AWS API request of a recorder download, in order."""
    calls = []
    for line in text.splitlines():
        if line.strip():
            call = parse_entry(json.loads(line))
            if call is not None:
                calls.append(call)
    return calls


def parse_entry(entry: dict[str, Any]) -> Call | None:
    """The Call of one recorded request, or None for an unsigned one (not an AWS API call)."""
    headers = {key.lower(): value for key, value in entry.get("headers", {}).items()}
    found = _CREDENTIAL.search(headers.get("authorization", ""))
    if found is None:
        return None
    access_key_id, region, signing_name = found.groups()
    prefix = IAM_PREFIX_OF_SIGNING_NAME.get(signing_name, signing_name)
    return Call(access_key_id, region, f"{prefix}:{_operation(entry, headers)}")


def _operation(entry: dict[str, Any], headers: dict[str, str]) -> str:
    # JSON protocols: X-Amz-Target: AmazonSSM.GetParameter (or GraniteServiceVersion20100801.X).
    if target := headers.get("x-amz-target"):
        return target.rsplit(".", 1)[-1]
    url = urlsplit(entry.get("url", ""))
    # Smithy RPC v2 CBOR (newer botocore's CloudWatch): /service/<Service>/operation/<Op>.
    if found := _RPC_V2_PATH.match(url.path):
        return found.group(1)
    # Query protocols (EC2, CloudFormation, SNS, IAM, STS): Action= in the form body or the URL.
    body = entry.get("body") or ""
    if entry.get("body_encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    for source in (body, url.query):
        action = parse_qs(source).get("Action")
        if action:
            return action[0]
    # REST protocols (S3, Lambda, ...) name the operation by method and path only.
    return f"?{entry.get('method', '')} {url.path}"


# --- the policy side ---------------------------------------------------------------------


def load_policy(path: Path | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _matches(pattern: str, action: str) -> bool:
    """IAM's action matching: * and ? wildcards, case-insensitive."""
    return fnmatch.fnmatchcase(action.lower(), pattern.lower())


def allowed_patterns(policy: dict[str, Any]) -> list[str]:
    """The Action entries of the policy's Allow statements, in order."""
    return [
        pattern
        for statement in _as_list_of_statements(policy)
        if statement.get("Effect") == "Allow"
        for pattern in _as_list(statement.get("Action", []))
    ]


def _as_list_of_statements(policy: dict[str, Any]) -> list[dict[str, Any]]:
    statements = policy.get("Statement", [])
    return [statements] if isinstance(statements, dict) else statements


def policy_allows(policy: dict[str, Any], action: str) -> bool:
    """Whether an Allow statement names the action (Deny statements never allow; ours have none)."""
    return any(_matches(pattern, action) for pattern in allowed_patterns(policy))


def unused_actions(policy: dict[str, Any], called_actions: Iterable[str]) -> list[str]:
    """The policy's Allow action entries that match none of the called actions."""
    called = list(called_actions)
    return [
        pattern
        for pattern in allowed_patterns(policy)
        if not any(_matches(pattern, action) for action in called)
    ]


def check_policy(
    policy_path: Path | str,
    called_actions: Iterable[str],
    exempt: dict[str, str] | None = None,
) -> list[str]:
    """What is wrong with a policy for these calls, one sentence each; [] when it fits exactly.

    Actions called but not allowed, and allowed actions nothing called, except those in
    ``exempt`` (default IAM_ONLY_ACTIONS and FEATURE_ACTIONS: action -> why the recording may
    not show it).
    """
    policy = load_policy(policy_path)
    exempt = IAM_ONLY_ACTIONS | FEATURE_ACTIONS if exempt is None else exempt
    called = sorted(set(called_actions))
    name = Path(policy_path).name
    problems = [
        f"{name} does not allow {action}, which was called"
        for action in called
        if not policy_allows(policy, action)
    ]
    for pattern in unused_actions(policy, called):
        if not any(_matches(pattern, action) for action in exempt):
            problems.append(f"{name} allows {pattern}, which nothing called")
    return problems


# --- what CloudFormation needs -------------------------------------------------------------

CLOUDFORMATION_HANDLERS = ("create", "read", "update", "delete")

# Handler permissions iam/cloudformation-role-policy.json leaves out: each is a write a handler
# makes only for a property stack.yaml does not set (resource type, those properties). The
# handlers' read-only Describe/List permissions all stay, set or not: a handler may read them
# for any resource. tests/aws/test_iam.py fails once stack.yaml sets one of these properties.
CLOUDFORMATION_UNUSED_PERMISSIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "iam:PassRole": ("AWS::EC2::Instance", ("IamInstanceProfile",)),
    "ec2:AssociateIamInstanceProfile": ("AWS::EC2::Instance", ("IamInstanceProfile",)),
    "ec2:DisassociateIamInstanceProfile": ("AWS::EC2::Instance", ("IamInstanceProfile",)),
    "ec2:ReplaceIamInstanceProfileAssociation": ("AWS::EC2::Instance", ("IamInstanceProfile",)),
    "ssm:CreateAssociation": ("AWS::EC2::Instance", ("SsmAssociations",)),
    "ssm:DeleteAssociation": ("AWS::EC2::Instance", ("SsmAssociations",)),
    "ec2:ModifyPrivateDnsNameOptions": ("AWS::EC2::Instance", ("PrivateDnsNameOptions",)),
    "ec2:ModifyInstanceCreditSpecification": ("AWS::EC2::Instance", ("CreditSpecification",)),
    "ec2:ModifyInstancePlacement": (
        "AWS::EC2::Instance",
        ("Affinity", "HostId", "HostResourceGroupArn", "Tenancy"),
    ),
    "ec2:MonitorInstances": ("AWS::EC2::Instance", ("Monitoring",)),
    "ec2:UnmonitorInstances": ("AWS::EC2::Instance", ("Monitoring",)),
    "ec2:AttachVolume": ("AWS::EC2::Instance", ("Volumes",)),
    "ec2:DetachVolume": ("AWS::EC2::Instance", ("Volumes",)),
    "ec2:AuthorizeSecurityGroupEgress": ("AWS::EC2::SecurityGroup", ("SecurityGroupEgress",)),
    "ec2:RevokeSecurityGroupEgress": ("AWS::EC2::SecurityGroup", ("SecurityGroupEgress",)),
    "ec2:UpdateSecurityGroupRuleDescriptionsEgress": (
        "AWS::EC2::SecurityGroup",
        ("SecurityGroupEgress",),
    ),
}

# What CloudFormation needs for the stack as a whole rather than for one resource type.
CLOUDFORMATION_STACK_PERMISSIONS = {
    "ssm:GetParameters": (
        "resolving the ImageId parameter (AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>) "
        "at create and update, with the service role when the stack has one"
    ),
}


def _schemas_dir() -> Path:
    import cfnlint  # noqa: PLC0415 -- a lint dependency: imported only where derivations run

    return Path(cfnlint.__file__).parent / "data" / "schemas"


def resource_types(template_path: Path | str) -> set[str]:
    """The resource types a CloudFormation template (YAML with short-form tags) declares, read
    from its expansion: resources inside an Fn::ForEach loop count as well."""
    return {resource["Type"] for resource in expanded_template(template_path)["Resources"].values()}


def expanded_template(template_path: Path | str) -> dict[str, Any]:
    """The template as CloudFormation processes it (lab/stack_template.py), its loops run for two
    items (two are enough to tell a loop from a single resource; every item is alike)."""
    stack_template = _lab_module("stack_template")
    template = stack_template.load(template_path)
    collections = [
        loop[1]
        for section in ("Resources", "Outputs", "Conditions")
        for key, loop in template.get(section, {}).items()
        if key.startswith(stack_template.FOR_EACH)
    ]
    two = {c["Ref"]: "1,2" for c in collections if isinstance(c, dict) and "Ref" in c}
    return stack_template.expand(template, two)


def _lab_module(name: str) -> Any:
    """A module of lab/ (standard library and cfn-lint only), imported by path."""
    lab = str(Path(__file__).resolve().parents[2] / "lab")
    if lab not in sys.path:
        sys.path.insert(0, lab)
    return importlib.import_module(name)


def provider_schema(resource_type: str, region: str = "us-east-1") -> dict[str, Any]:
    """cfn-lint's bundled resource provider schema of one resource type."""
    schemas = _schemas_dir()
    index = json.loads((schemas / "providers" / f"{region}.json").read_text())
    return json.loads((schemas / "resources" / f"{index[resource_type]}.json").read_text())


def cloudformation_permissions(template_path: Path | str) -> dict[str, set[str]]:
    """Every permission the handlers of the template's resource types list -> those types."""
    needed: dict[str, set[str]] = {}
    for resource_type in sorted(resource_types(template_path)):
        handlers = provider_schema(resource_type).get("handlers", {})
        for handler in CLOUDFORMATION_HANDLERS:
            for permission in handlers.get(handler, {}).get("permissions", []):
                needed.setdefault(permission, set()).add(resource_type)
    return needed


def cloudformation_role_actions(template_path: Path | str) -> set[str]:
    """What the stack's service role must allow: the handlers' permissions for the template's
    resource types, less CLOUDFORMATION_UNUSED_PERMISSIONS, plus CLOUDFORMATION_STACK_PERMISSIONS.
    """
    derived = set(cloudformation_permissions(template_path)) - set(
        CLOUDFORMATION_UNUSED_PERMISSIONS
    )
    return derived | set(CLOUDFORMATION_STACK_PERMISSIONS)


def check_cloudformation_role(policy_path: Path | str, template_path: Path | str) -> list[str]:
    """check_policy for the service role: the derivation stands in for a recording, since
    CloudFormation's own calls never reach the emulator's recorder."""
    return check_policy(policy_path, cloudformation_role_actions(template_path), exempt={})
