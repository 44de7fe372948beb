"""The AWS region, found the way the AWS CLI and SDKs find it, for the inventory and the playbooks.

One resolution for both, so that inventory/aws_ec2.yml lists the fleet in the region
provision.yml created it in: AWS_REGION, then AWS_DEFAULT_REGION, then the ``region`` of the
profile AWS_PROFILE names (``default`` without it) in AWS_CONFIG_FILE (~/.aws/config), read
through botocore as the SDKs read it. No region at all is an error that says how to set one:
a silent default region would create a fleet, or list an empty one, where nobody looks.

botocore alone does not read AWS_REGION (only AWS_DEFAULT_REGION), and the amazon.aws modules
and the aws_ec2 inventory each resolve the region their own way, hence this one plugin.
"""

from __future__ import annotations

import os

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase

DOCUMENTATION = """
name: greeter_aws_region
short_description: the AWS region from AWS_REGION, AWS_DEFAULT_REGION or the AWS profile
description:
  - Returns the region named by AWS_REGION, else AWS_DEFAULT_REGION, else the region of the
    profile AWS_PROFILE names (default C(default)) in AWS_CONFIG_FILE (~/.aws/config).
  - Fails, saying how to set one, when none of them names a region.
options: {}
requirements:
  - botocore
"""

EXAMPLES = """
greeter_stack_region: "{{ lookup('greeter_aws_region') }}"
"""

RETURN = """
_raw:
  description: one element, the region name
  type: list
  elements: str
"""

HOW_TO_SET = (
    "set AWS_REGION (for example `export AWS_REGION=eu-west-1`), or AWS_DEFAULT_REGION, or "
    "`region = eu-west-1` in the profile AWS_PROFILE names ([default] without it) in "
    "~/.aws/config (or the file AWS_CONFIG_FILE names)"
)


def profile_region() -> str:
    """The region of the current profile, as botocore reads it ("" when it names none)."""
    import botocore.exceptions  # noqa: PLC0415 - only when the environment names no region
    import botocore.session  # noqa: PLC0415

    session = botocore.session.Session()
    try:
        return session.get_scoped_config().get("region") or ""
    except botocore.exceptions.ProfileNotFound as error:
        raise AnsibleError(f"No AWS region: {error}; {HOW_TO_SET}.") from None


def aws_region() -> str:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name]
    region = profile_region()
    if not region:
        profile = os.environ.get("AWS_PROFILE") or "default"
        raise AnsibleError(
            f"No AWS region: AWS_REGION and AWS_DEFAULT_REGION are unset and profile "
            f"{profile!r} names none; {HOW_TO_SET}."
        )
    return region


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        return [aws_region()]
