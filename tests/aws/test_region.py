"""The region, found as the AWS CLI finds it (AWS_REGION, AWS_DEFAULT_REGION, the profile's), the
same in the inventory and the playbooks (plugins/lookup/greeter_aws_region.py); none is an error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from aws_helpers import BIN, KEY_NAME, REPO, Aws, tags

pytestmark = pytest.mark.aws

NO_REGION = "No AWS region: AWS_REGION and AWS_DEFAULT_REGION are unset"


def region_env(aws: Aws, stack: str, source: str, region: str, tmp_path: Path) -> dict[str, str]:
    """The tests' environment with the region given only by `source`."""
    env = aws.env(stack)
    del env["AWS_REGION"], env["AWS_DEFAULT_REGION"]
    # Never the real ~/.aws: files of the test's own, empty unless the profile is the source.
    config, credentials = tmp_path / "aws-config", tmp_path / "aws-credentials"
    config.write_text("")
    credentials.write_text("")
    env.update(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(credentials))
    if source == "profile":
        # A profile holds its credentials too (amazon.aws refuses a profile plus key variables).
        config.write_text(
            f"[profile greeter-test]\nregion = {region}\n"
            f"aws_access_key_id = {env.pop('AWS_ACCESS_KEY_ID')}\n"
            f"aws_secret_access_key = {env.pop('AWS_SECRET_ACCESS_KEY')}\n"
        )
        env["AWS_PROFILE"] = "greeter-test"
    elif source:
        env[source] = region
    return env


@pytest.mark.parametrize(
    ("source", "region"),
    [
        ("AWS_REGION", "eu-west-1"),
        ("AWS_DEFAULT_REGION", "ap-southeast-2"),
        ("profile", "eu-central-1"),
    ],
)
def test_provision_and_the_inventory_use_the_same_region(
    aws: Aws, stack: str, tmp_path: Path, source: str, region: str
) -> None:
    env = region_env(aws, stack, source, region, tmp_path)

    result = aws.provision(stack, env=env, region=region)

    assert result.returncode == 0, result.stdout + result.stderr
    assert [s["StackStatus"] for s in aws.live_stacks(stack, region)] == ["CREATE_COMPLETE"]
    assert aws.live_stacks(stack) == []  # nothing in us-east-1, the old silent default
    names = sorted(tags(i)["Name"] for i in aws.instances(stack, "running", region=region))
    assert names == [f"{stack}-1", f"{stack}-lb"]
    inventory = aws.inventory(stack, env=env)
    group = "aws_region_" + region.replace("-", "_")
    assert sorted(inventory[group]["hosts"]) == names
    shown = aws.on_localhost(stack, "region={{ greeter_stack_region }}", env=env)
    assert f"region={region}" in shown


def test_no_region_at_all_is_an_error_that_says_how_to_set_one(
    aws: Aws, stack: str, tmp_path: Path
) -> None:
    env = region_env(aws, stack, "", "", tmp_path)

    listed = aws.run(stack, str(BIN / "ansible-inventory"), "--list", env=env)
    provisioned = aws.provision(stack, env=env)

    for result in (listed, provisioned):
        assert result.returncode != 0
        text = " ".join(result.stderr.split())
        assert NO_REGION in text, result.stderr[-3000:]
        assert "set AWS_REGION (for example `export AWS_REGION=eu-west-1`)" in text
    assert "TASK [" not in provisioned.stdout
    assert aws.live_stacks(stack) == []


def test_a_key_pair_of_another_region_is_refused_naming_the_region(
    aws: Aws, stack: str, tmp_path: Path
) -> None:
    aws.import_key_pair("us-east-1")  # but not in sa-east-1
    env = region_env(aws, stack, "AWS_REGION", "sa-east-1", tmp_path)

    result = aws.playbook(
        stack,
        "provision.yml",
        "greeter_stack_admin_cidr=203.0.113.7/32",
        f"greeter_stack_key_name={KEY_NAME}",
        "greeter_stack_wait_for_ssh=false",
        env=env,
    )

    text = " ".join(result.stdout.split())
    assert result.returncode == 2, text[-3000:]
    assert f'region sa-east-1 has no EC2 key pair "{KEY_NAME}"' in text
    assert "Nothing was created." in text
    assert "TASK [Create or update the stack]" not in text
    assert aws.live_stacks(stack, "sa-east-1") == []


def load_lookup():
    path = REPO / "plugins" / "lookup" / "greeter_aws_region.py"
    spec = importlib.util.spec_from_file_location("greeter_aws_region", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("environment", "region"),
    [
        ({"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}, "eu-west-1"),
        ({"AWS_DEFAULT_REGION": "eu-west-2"}, "eu-west-2"),
        ({"AWS_REGION": "", "AWS_DEFAULT_REGION": "eu-west-2"}, "eu-west-2"),
        ({}, "eu-west-3"),
    ],
    ids=["AWS_REGION-first", "then-AWS_DEFAULT_REGION", "empty-is-unset", "then-the-profile"],
)
def test_the_region_sources_in_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environment: dict[str, str], region: str
) -> None:
    config = tmp_path / "config"
    config.write_text("[profile p]\nregion = eu-west-3\n")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "p")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert load_lookup().LookupModule().run([]) == [region]


def test_a_profile_that_does_not_exist_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "config").write_text("[profile p]\nregion = eu-west-3\n")
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    with pytest.raises(Exception, match=r"No AWS region: The config profile \(nosuch\)"):
        load_lookup().LookupModule().run([])
