"""iam/: the policy files are IAM's grammar, the trust policies trust what they should, the
matcher behaves as IAM does, the service role holds what CloudFormation's schemas say, and a real
recording of provision, alarms and teardown on the emulator stays inside operator-policy.json."""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import time
from pathlib import Path

import pytest
from aws_helpers import BIN, REPO, Aws
from support.aws_calls import (
    CLOUDFORMATION_UNUSED_PERMISSIONS,
    FEATURE_ACTIONS,
    IAM_ONLY_ACTIONS,
    AwsCallRecorder,
    check_cloudformation_role,
    check_policy,
    expanded_template,
    load_policy,
    parse_entry,
    parse_recording,
    policy_allows,
    provider_schema,
    unused_actions,
)
from support.lock_module import Worker

pytestmark = pytest.mark.aws

IAM = REPO / "iam"
PERMISSION_POLICIES = sorted(
    p.name for p in IAM.glob("*-policy.json") if not p.name.endswith("-trust-policy.json")
)
TRUST_POLICIES = sorted(p.name for p in IAM.glob("*-trust-policy.json"))
ROLE_ARN = "arn:aws:iam::123456789012:role/greeter-cloudformation"
# IAM's limits: a managed policy's JSON without whitespace, a role's trust policy (default quota).
MANAGED_POLICY_MAX_CHARS = 6144
TRUST_POLICY_MAX_CHARS = 2048
ACTION = re.compile(r"^[a-z0-9-]+:[A-Za-z0-9*?]+$")


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_the_iam_folder_holds_every_policy_the_readme_names() -> None:
    assert PERMISSION_POLICIES == [
        "ci-deploy-policy.json",
        "cloudformation-role-policy.json",
        "operator-policy.json",
        "probe-policy.json",
    ]
    assert TRUST_POLICIES == [
        "ci-deploy-trust-policy.json",
        "cloudformation-role-trust-policy.json",
        "probe-trust-policy.json",
    ]
    readme = (IAM / "README.md").read_text()
    for name in PERMISSION_POLICIES + TRUST_POLICIES:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", PERMISSION_POLICIES + TRUST_POLICIES)
def test_each_policy_file_is_iam_grammar(name: str) -> None:
    text = (IAM / name).read_text()
    policy = json.loads(text)
    trust = name in TRUST_POLICIES
    assert set(policy) == {"Version", "Statement"}
    assert policy["Version"] == "2012-10-17"
    assert isinstance(policy["Statement"], list) and policy["Statement"]
    sids = [statement["Sid"] for statement in policy["Statement"]]
    assert len(sids) == len(set(sids)), f"{name}: Sids repeat"
    for statement in policy["Statement"]:
        # A Sid is IAM's only comment: it says why, in the letters and digits IAM allows.
        assert re.fullmatch(r"[A-Za-z0-9]+", statement["Sid"]), statement["Sid"]
        assert statement["Effect"] == "Allow"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Principal", "Condition"}
        assert all(ACTION.match(action) for action in as_list(statement["Action"])), statement
        if trust:
            assert "Principal" in statement and "Resource" not in statement
        else:
            assert "Resource" in statement and "Principal" not in statement
            for resource in as_list(statement["Resource"]):
                assert resource == "*" or resource.startswith("arn:aws:"), resource
        for operator, keys in statement.get("Condition", {}).items():
            assert isinstance(keys, dict) and keys, (operator, keys)
    limit = TRUST_POLICY_MAX_CHARS if trust else MANAGED_POLICY_MAX_CHARS
    assert len(re.sub(r"\s", "", text)) <= limit


def test_every_star_resource_says_why_in_its_sid() -> None:
    for name in PERMISSION_POLICIES:
        for statement in load_policy(IAM / name)["Statement"]:
            if statement["Resource"] == "*":
                assert re.search(r"Star|NoResource", statement["Sid"]), (name, statement["Sid"])


@pytest.mark.parametrize(
    ("name", "environments"),
    [
        ("ci-deploy-trust-policy.json", ["staging", "production"]),
        ("probe-trust-policy.json", ["production"]),
    ],
)
def test_ci_roles_trust_githubs_oidc_provider_for_this_repositorys_environments_only(
    name: str, environments: list[str]
) -> None:
    [statement] = load_policy(IAM / name)["Statement"]
    assert statement["Principal"] == {
        "Federated": "arn:aws:iam::ACCOUNT_ID:oidc-provider/token.actions.githubusercontent.com"
    }
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert set(statement["Condition"]) == {"StringEquals"}  # exact, never StringLike with *
    conditions = statement["Condition"]["StringEquals"]
    assert conditions["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
    assert as_list(conditions["token.actions.githubusercontent.com:sub"]) == [
        f"repo:YOUR-ORG/YOUR-REPO:environment:{environment}" for environment in environments
    ]


def test_only_cloudformation_of_this_account_assumes_the_stack_role() -> None:
    [statement] = load_policy(IAM / "cloudformation-role-trust-policy.json")["Statement"]
    assert statement["Principal"] == {"Service": "cloudformation.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"
    assert statement["Condition"] == {"StringEquals": {"aws:SourceAccount": "ACCOUNT_ID"}}


def test_stack_changes_need_the_service_role_and_only_cloudformation_gets_it() -> None:
    for name in ("operator-policy.json", "ci-deploy-policy.json"):
        statements = load_policy(IAM / name)["Statement"]
        [writes] = [s for s in statements if "cloudformation:CreateStack" in s["Action"]]
        assert sorted(writes["Action"]) == [
            "cloudformation:CreateStack",
            "cloudformation:UpdateStack",
        ]
        assert writes["Condition"] == {
            "StringEquals": {
                "cloudformation:RoleArn": ROLE_ARN.replace("123456789012", "ACCOUNT_ID")
            }
        }
        [passing] = [s for s in statements if s["Action"] == "iam:PassRole"]
        assert passing["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/greeter-cloudformation"
        assert passing["Condition"] == {
            "StringEquals": {"iam:PassedToService": "cloudformation.amazonaws.com"}
        }
        # The caller holds no EC2 write: CloudFormation does those with the role.
        ec2 = {a for s in statements for a in as_list(s["Action"]) if a.startswith("ec2:")}
        assert ec2 == {"ec2:DescribeInstances", "ec2:DescribeKeyPairs"}


def test_the_matcher_follows_iams_wildcards_and_case() -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["ec2:Describe*", "sns:Publish"], "Resource": "*"},
            {"Effect": "Allow", "Action": "cloudwatch:Put?etricData", "Resource": "*"},
            {"Effect": "Deny", "Action": "iam:*", "Resource": "*"},
        ],
    }
    assert policy_allows(policy, "ec2:DescribeInstances")
    assert policy_allows(policy, "EC2:describeinstances")  # IAM compares case-insensitively
    assert policy_allows(policy, "sns:publish")
    assert policy_allows(policy, "cloudwatch:PutMetricData")
    assert not policy_allows(policy, "ec2:RunInstances")
    assert not policy_allows(policy, "sns:PublishBatch")  # no implicit prefix match
    assert not policy_allows(policy, "iam:PassRole")  # a Deny never allows
    assert not policy_allows(policy, "cloudwatch:PutetricData")  # ? is exactly one character
    assert not policy_allows(policy, "cloudwatch:PutMMetricData")
    single = {"Statement": {"Effect": "Allow", "Action": "sts:GetCallerIdentity"}}
    assert policy_allows(single, "sts:getcalleridentity")  # one statement, not a list

    assert unused_actions(policy, ["ec2:DescribeVpcs"]) == [
        "sns:Publish",
        "cloudwatch:Put?etricData",
    ]
    assert (
        unused_actions(policy, ["EC2:DESCRIBEVPCS", "SNS:PUBLISH", "cloudwatch:PutMetricData"])
        == []
    )


def entry(headers: dict[str, str], body: str = "", url: str = "/", method: str = "POST") -> dict:
    return {"headers": headers, "method": method, "url": url, "body": body, "body_encoded": False}


def signed(key: str, service: str, region: str = "us-east-1") -> dict[str, str]:
    credential = f"{key}/20261207/{region}/{service}/aws4_request"
    return {"Authorization": f"AWS4-HMAC-SHA256 Credential={credential}, Signature=0"}


def test_the_parser_names_the_iam_action_of_each_protocol_and_its_caller() -> None:
    query = entry(signed("op", "ec2"), "Action=DescribeInstances&Version=2016-11-15")
    assert parse_entry(query).action == "ec2:DescribeInstances"
    assert (parse_entry(query).access_key_id, parse_entry(query).region) == ("op", "us-east-1")
    encoded = dict(query, body=base64.b64encode(b"Action=CreateStack").decode(), body_encoded=True)
    assert parse_entry(encoded).action == "ec2:CreateStack"
    in_url = entry(signed("op", "sns"), url="/?Action=ListTopics&Version=2010-03-31", method="GET")
    assert parse_entry(in_url).action == "sns:ListTopics"
    json_target = entry({**signed("ci", "ssm"), "X-Amz-Target": "AmazonSSM.GetParameter"})
    assert parse_entry(json_target).action == "ssm:GetParameter"
    # The signing name is not always the IAM prefix: CloudWatch signs as "monitoring".
    cbor = entry(
        signed("probe", "monitoring"),
        url="/service/GraniteServiceVersion20100801/operation/PutMetricData",
    )
    assert parse_entry(cbor).action == "cloudwatch:PutMetricData"
    rest = entry(signed("op", "s3"), url="/bucket/key", method="PUT")
    assert parse_entry(rest).action == "s3:?PUT /bucket/key"  # named, never dropped
    assert parse_entry(entry({}, "Action=DescribeInstances")) is None  # unsigned: not a call
    lines = "\n".join(json.dumps(e) for e in (query, entry({}), json_target)) + "\n\n"
    assert [c.action for c in parse_recording(lines)] == [
        "ec2:DescribeInstances",
        "ssm:GetParameter",
    ]


def test_the_service_role_holds_exactly_what_the_schemas_say_cloudformation_needs() -> None:
    assert (
        check_cloudformation_role(IAM / "cloudformation-role-policy.json", REPO / "stack.yaml")
        == []
    )


def test_each_left_out_permission_belongs_to_a_property_stack_yaml_does_not_set() -> None:
    resources = expanded_template(REPO / "stack.yaml")["Resources"].values()
    for action, (resource_type, properties) in CLOUDFORMATION_UNUSED_PERMISSIONS.items():
        schema = provider_schema(resource_type)
        assert set(properties) <= set(schema["properties"]), (action, properties)
        handlers = schema["handlers"].values()
        assert any(action in h.get("permissions", []) for h in handlers), action
        for resource in resources:
            if resource["Type"] == resource_type:
                assert not set(properties) & set(resource["Properties"]), (action, properties)


def test_a_new_resource_type_in_the_template_is_reported_missing_from_the_role(
    tmp_path: Path,
) -> None:
    template = tmp_path / "stack.yaml"
    text = (REPO / "stack.yaml").read_text()
    template.write_text(
        text.replace(
            "\nResources:\n",
            "\nResources:\n  Address:\n    Type: AWS::EC2::EIP\n    Properties: {Domain: vpc}\n",
            1,
        )
    )
    problems = check_cloudformation_role(IAM / "cloudformation-role-policy.json", template)
    assert (
        "cloudformation-role-policy.json does not allow ec2:AllocateAddress, which was called"
        in problems
    )


def test_the_emulator_records_into_its_own_file_not_the_working_directory(aws: Aws) -> None:
    recorder = AwsCallRecorder(aws.endpoint)
    with recorder.recording():
        aws.client("sts").get_caller_identity()
    assert "sts:GetCallerIdentity" in recorder.actions("testing")
    recorder.reset()
    assert recorder.download() == ""
    assert not (Path.cwd() / "moto_recording").exists()
    assert not (REPO / "moto_recording").exists()


def test_provision_hands_cloudformation_the_service_role_and_refuses_a_bad_one(
    aws: Aws, stack: str
) -> None:
    bad = aws.provision(stack, "greeter_stack_role_arn=greeter-cloudformation")
    assert bad.returncode == 2, bad.stdout
    assert "greeter_stack_role_arn: empty or an IAM role ARN" in bad.stdout
    assert "Nothing was created." in bad.stdout
    assert aws.live_stacks(stack) == []

    result = aws.provision(stack, env=aws.env(stack, GREETER_STACK_ROLE_ARN=ROLE_ARN))
    assert result.returncode == 0, result.stdout + result.stderr
    [described] = aws.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    assert described["RoleARN"] == ROLE_ARN


# Operator-policy actions only a run on lab hosts exercises (the end-to-end proof in
# tests/dayone): the deploy's outcome notice, the probe's metrics and the deploy lock's take and
# check (teardown only deletes a leftover lock; test_the_deploy_lock_... below records the rest).
NEEDS_HOSTS = {"sns:Publish", "cloudwatch:PutMetricData", "ssm:PutParameter", "ssm:GetParameter"}
LOCK_ACTIONS = {"ssm:PutParameter", "ssm:GetParameter", "ssm:DeleteParameter"}


def test_provision_alarms_and_teardown_call_only_what_the_operator_policy_allows(
    aws: Aws, stack: str, tmp_path: Path
) -> None:
    recorder = AwsCallRecorder(aws.endpoint)
    key = f"operator-{stack}"  # moto takes any key id; only this run's calls carry this one
    env = aws.env(stack, AWS_ACCESS_KEY_ID=key, GREETER_STACK_ROLE_ARN=ROLE_ARN)
    steps = [
        ("provision.yml", ["greeter_stack_instance_count=2"]),
        ("provision.yml", ["greeter_stack_instance_count=2"]),  # a rerun updates the stack
        ("alarms.yml", ["greeter_probe_publish=true", "greeter_alarms_email=ops@example.com"]),
        ("alarms.yml", []),  # the healthy-hosts alarm goes
        ("teardown.yml", ["greeter_teardown_confirm=true"]),
    ]
    durations = []
    with recorder.recording():
        for playbook, extra in steps:
            started = time.monotonic()
            if playbook == "provision.yml":
                result = aws.provision(stack, *extra, env=env)
            else:
                result = aws.playbook(stack, playbook, *extra, env=env)
            durations.append(f"{playbook} {time.monotonic() - started:.1f} s")
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    print(f"\n[iam timing] {', '.join(durations)}")
    called = recorder.actions(key)
    assert {
        "cloudformation:CreateStack",
        "cloudformation:UpdateStack",
        "cloudformation:DeleteStack",
        "cloudwatch:PutMetricAlarm",
        "cloudwatch:DeleteAlarms",
        "sns:Subscribe",
        "sns:Unsubscribe",
        "sns:DeleteTopic",
        "ec2:DescribeKeyPairs",
    } <= called

    policy = IAM / "operator-policy.json"
    problems = check_policy(policy, called)
    unused = {p.split(" allows ", 1)[1].split(",")[0] for p in problems if " allows " in p}
    assert [p for p in problems if "does not allow" in p] == []
    assert unused <= NEEDS_HOSTS, problems
    assert set(IAM_ONLY_ACTIONS) & unused == set()  # exempt, never reported

    # Mutation: the same calls against a policy without UpdateStack.
    weaker = load_policy(policy)
    for statement in weaker["Statement"]:
        if (
            isinstance(statement["Action"], list)
            and "cloudformation:UpdateStack" in statement["Action"]
        ):
            statement["Action"].remove("cloudformation:UpdateStack")
    copy = tmp_path / "operator-policy.json"
    copy.write_text(json.dumps(weaker))
    assert (
        "operator-policy.json does not allow cloudformation:UpdateStack, which was called"
        in check_policy(copy, called)
    )


def test_the_deploy_lock_calls_three_ssm_actions_on_greeter_parameters_both_deployers_hold(
    aws: Aws,
) -> None:
    """A take, a refused take, the check before a batch, a break, the release and teardown's
    purge, by the role's own module, recorded under their own key: exactly three SSM actions,
    allowed to the operator and to CI's deploy role on /greeter/* parameters only."""
    recorder = AwsCallRecorder(aws.endpoint)
    key = "lock-caller"
    worker = Worker(aws.env("iamlock", AWS_ACCESS_KEY_ID=key))
    name = "/greeter/iamlock/deploy-lock"
    first, second = "0123456789abcdef", "fedcba9876543210"
    try:
        with recorder.recording():
            assert worker.call({"name": name, "run_id": first}).won
            assert not worker.call({"name": name, "run_id": second}).won
            assert worker.call({"name": name, "run_id": first, "state": "held"}).won
            assert worker.call({"name": name, "run_id": second, "break_lock": first}).won
            assert worker.call({"name": name, "run_id": second, "state": "absent"}).won
            assert worker.call({"name": name, "state": "purged"}).won
    finally:
        worker.close()
    called = recorder.actions(key)
    assert called == LOCK_ACTIONS
    for policy in ("operator-policy.json", "ci-deploy-policy.json"):
        assert [p for p in check_policy(IAM / policy, called) if "does not allow" in p] == []
        [statement] = [
            s for s in load_policy(IAM / policy)["Statement"] if "ssm:PutParameter" in s["Action"]
        ]
        assert set(statement["Action"]) == LOCK_ACTIONS
        # the lock and its break claim only: a deployer may not write the stack's secrets
        assert statement["Resource"] == "arn:aws:ssm:*:ACCOUNT_ID:parameter/greeter/*/deploy-lock*"
    assert not any(
        action.startswith("ssm:")
        for s in load_policy(IAM / "probe-policy.json")["Statement"]
        for action in as_list(s["Action"])
    )


SECRETS_ACTIONS = {"ssm:GetParameter", "secretsmanager:GetSecretValue"}
# The role's preflight alone (no host): it reads greeter_extra_env_from on the controller.
PREFLIGHT_PLAY = """
- name: Read greeter_extra_env_from as a deploy's preflight does
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Preflight
      ansible.builtin.include_role:
        name: greeter
        tasks_from: preflight.yml
    - name: Show how many values were read (never a value)
      ansible.builtin.debug:
        msg: "read {{ _greeter_env_from.values() | select | list | length }} values"
"""


def resource_patterns(policy: str, action: str) -> list[str]:
    return [
        resource
        for statement in load_policy(IAM / policy)["Statement"]
        if action in as_list(statement["Action"])
        for resource in as_list(statement["Resource"])
    ]


def test_greeter_extra_env_from_reads_two_actions_both_deployers_hold(
    aws: Aws, tmp_path: Path
) -> None:
    """The role's preflight reads a SecureString and a Secrets Manager secret with the amazon.aws
    lookups (endpoint from AWS_ENDPOINT_URL, region from the stack's lookup): exactly
    ssm:GetParameter and secretsmanager:GetSecretValue, which both deployers' policies allow on
    the stack's /greeter/<stack>/secrets/ names only (kms:Decrypt only through those services);
    -v shows no value; a missing reference fails naming it, not a value."""
    stack = "greeter-iamsecrets"
    ssm, secrets = aws.client("ssm"), aws.client("secretsmanager")
    parameter, secret = f"/greeter/{stack}/secrets/api-token", f"greeter/{stack}/secrets/db"
    values = [f"ssm-{time.time_ns()}", f"sm-{time.time_ns()}"]
    ssm.put_parameter(Name=parameter, Value=values[0], Type="SecureString", Overwrite=True)
    secrets.create_secret(Name=secret, SecretString=values[1])
    play = tmp_path / "preflight.yml"
    play.write_text(PREFLIGHT_PLAY)
    key = "secrets-caller"
    env = aws.env(stack, AWS_ACCESS_KEY_ID=key)

    def preflight(*refs: dict[str, str]) -> str:
        extra = {
            "greeter_repo_url": "https://git.example.invalid/greeter.git",
            "greeter_version": "0" * 40,  # a commit id: no git server needed
            "greeter_release_key_file": str(tmp_path / "release-key"),
            "greeter_extra_env_from": list(refs),
        }
        result = aws.run(stack, str(BIN / "ansible-playbook"), str(play), "-v",
                         "-i", "localhost,", "-e", json.dumps(extra), env=env)  # fmt: skip
        shown = result.stdout + result.stderr
        assert not any(value in shown for value in values), "a value was shown"
        return shown if result.returncode == 0 else f"failed rc={result.returncode}\n{shown}"

    refs = ({"name": "API_TOKEN", "ssm": parameter}, {"name": "DB", "secretsmanager": secret})
    with AwsCallRecorder(aws.endpoint).recording() as recorder:
        shown = preflight(*refs)
    assert "read 2 values" in shown, shown[-3000:]
    called = recorder.actions(key)
    assert called == SECRETS_ACTIONS
    arns = {
        "ssm:GetParameter": f"arn:aws:ssm:us-east-1:ACCOUNT_ID:parameter{parameter}",
        "secretsmanager:GetSecretValue":
            f"arn:aws:secretsmanager:us-east-1:ACCOUNT_ID:secret:{secret}-AbCdEf",
    }  # fmt: skip
    for policy in ("operator-policy.json", "ci-deploy-policy.json"):
        assert [p for p in check_policy(IAM / policy, called) if "does not allow" in p] == []
        for action, arn in arns.items():
            patterns = resource_patterns(policy, action)
            assert any(fnmatch.fnmatchcase(arn, p) for p in patterns), (policy, action)
        # the lock's statement no longer covers the secrets (nor lets a deployer write them)
        other = f"arn:aws:ssm:us-east-1:ACCOUNT_ID:parameter/other/{stack}/secrets/x"
        readable = resource_patterns(policy, "ssm:GetParameter")
        assert not any(fnmatch.fnmatchcase(other, p) for p in readable)
        assert not any(
            fnmatch.fnmatchcase(arns["ssm:GetParameter"], p)
            for p in resource_patterns(policy, "ssm:PutParameter")
        )
        decrypt = [
            s for s in load_policy(IAM / policy)["Statement"] if s["Action"] == "kms:Decrypt"
        ]
        assert sorted(s["Condition"]["StringLike"]["kms:ViaService"] for s in decrypt) == [
            "secretsmanager.*.amazonaws.com",
            "ssm.*.amazonaws.com",
        ]
    assert "secretsmanager:GetSecretValue" in FEATURE_ACTIONS
    assert "kms:Decrypt" in IAM_ONLY_ACTIONS

    missing = f"/greeter/{stack}/secrets/missing"
    refused = preflight(*refs, {"name": "GONE", "ssm": missing})
    assert refused.startswith("failed"), refused[-3000:]
    assert f"GONE (from SSM parameter {missing})" in refused
    assert "Nothing was changed." in refused
