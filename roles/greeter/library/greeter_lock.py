#!/usr/bin/python
"""Take, check, release or break the fleet's deploy lock: one SSM parameter in the AWS account.

Two runs must never change the same fleet at once (Kamal's ``kamal lock``, CodeDeploy's one
deployment per group). The lock lives in the account, not on a host: a lock folder on the first
host (Kamal's choice, and this role's until issue 22) made that host's loss block every deploy
and every rollback. It is taken from the controller with ``PutParameter`` and ``Overwrite=False``,
which the service decides atomically: of two runs exactly one creates the parameter, the other
gets ``ParameterAlreadyExists`` and reads who holds it (Terraform's state lock is the same idea
with a DynamoDB conditional write).

Why our own module and not community.aws.ssm_parameter: with ``overwrite_value: never`` that
module leaves an existing parameter alone and reports success, so both runs would believe they
hold the lock. The refusal has to be the API's own, which only a direct ``PutParameter`` sees.

SSM has no conditional delete, so a break is serialised by a second create-only parameter, the
break claim (``<name>-break``): of two runs breaking at once only the one that creates the claim
goes on, re-reads the lock (unchanged since it was judged?), deletes it and creates its own with
``Overwrite=False``; then it removes the claim. Region, credentials and endpoint come the
standard way (``region``, else AWS_REGION or the profile; AWS_ENDPOINT_URL in tests).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # reported by main(): boto3 is a controller requirement (requirements.txt)
    boto3 = None

# Every remote wait is bounded: a wedged endpoint fails the run, it does not hang it.
CLIENT_CONFIG = (
    Config(connect_timeout=10, read_timeout=20, retries={"max_attempts": 4}) if boto3 else None
)

DOCUMENTATION = r"""
---
module: greeter_lock
short_description: Take, check, release or break a greeter fleet's deploy lock (SSM parameter)
description:
  - O(state=present) creates the SSM parameter O(name) holding O(record), this run's O(run_id) and
    the time, or fails naming the run that holds it (run id, holder, action, version, when, age).
  - O(break_lock) with O(state=present) breaks another run's lock, only when it names that run's
    id or is C(stale) and the lock is older than O(stale_after) seconds.
  - O(state=held) reports whether this run still holds the lock (RV(held)), never failing on it.
  - O(state=absent) deletes the lock if this run holds it; a lock held by another run is left alone.
  - O(state=purged) deletes the lock and its break claim whoever holds them (the stack's teardown).
options:
  name:
    description: The lock's SSM parameter name, e.g. /greeter/<stack>/deploy-lock.
    type: str
    required: true
  region:
    description: AWS region; empty takes the standard resolution (AWS_REGION, the profile).
    type: str
    default: ""
  run_id:
    description: This run's id (16 hex digits); required unless O(state=purged).
    type: str
  state:
    description: Take (present), check (held), release (absent) or delete whoever's (purged) lock.
    type: str
    choices: [present, held, absent, purged]
    default: present
  record:
    description: What a refused run learns of this one (user, controller, action, play, version).
    type: dict
    default: {}
  break_lock:
    description: Empty, C(stale), or the run id of the run whose lock to break.
    type: str
    default: ""
  stale_after:
    description: Seconds after which C(break_lock=stale) may break a lock.
    type: int
    default: 3600
requirements: [boto3]
author: greeter project
"""

RETURN = r"""
holder:
  description: The lock's record now (this run's after a take), or null when nobody holds it.
  returned: always
  type: dict
held:
  description: Whether this run holds the lock.
  returned: always
  type: bool
broken:
  description: The record of the lock this run broke (with its age), or null.
  returned: state=present
  type: dict
msg:
  description: With state=held and RV(held) false, what happened to this run's lock.
  returned: always
  type: str
"""

RUN_ID = re.compile(r"^[0-9a-f]{16}$")
# A break is three calls; a claim older than this was left by a breaker that died between them.
CLAIM_ABANDONED_SECONDS = 120
# A take retries when the lock vanishes between the refused create and the read (released then).
TAKE_ATTEMPTS = 5
# A breaker that finds another's claim waits this long for that break to end, to name the run
# that really holds the lock after it (a plain take may win the instant the breaker deletes).
CLAIM_WAIT_SECONDS = 15


def _now() -> datetime:
    return datetime.now(timezone.utc)


def age_text(seconds: float) -> str:
    """A lock's age for people: 45 s, 12 min 5 s, 3 h 7 min, 2 d 4 h."""
    total = max(int(seconds), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def describe(held: dict) -> str:
    """Who holds a lock, for a message: run, holder, what, since when and how long."""
    return (
        'run {run_id} of {holder}: {action} of {version} (play "{play}"), taken {time}, {age} ago'
    ).format(
        holder=f"{held.get('user', '?')}@{held.get('controller', '?')}",
        age=age_text(held.get("age_seconds", 0)),
        **{k: held.get(k, "?") for k in ("run_id", "action", "version", "play", "time")},
    )


class Parameters:
    """The few SSM calls the lock makes, with the lock's own meaning of their errors."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        region = module.params["region"] or None
        self.client = boto3.client("ssm", region_name=region, config=CLIENT_CONFIG)

    def _call(self, what: str, operation: str, expected: str, **kwargs) -> dict | None:
        """`operation` of the SSM client, or None when the service answers with the error code
        `expected` (the lock's normal case: absent, or taken); any other error fails the run."""
        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as error:
            if error.response["Error"]["Code"] == expected:
                return None
            failure: Exception = error
        except BotoCoreError as error:
            failure = error
        self.module.fail_json(
            msg=f"Could not {what} the deploy lock {self.module.params['name']}: {failure}. "
            "Nothing was changed.",
        )
        return None  # not reached: fail_json exits

    def read(self, name: str) -> dict | None:
        """The parameter's JSON value, with its age by the account's clock, or None if absent."""
        answer = self._call("read", "get_parameter", "ParameterNotFound", Name=name)
        if answer is None:
            return None
        found = answer["Parameter"]
        try:
            value = json.loads(found["Value"])
        except ValueError:
            value = {"run_id": "?", "value": found["Value"]}
        modified = found["LastModifiedDate"]
        value["age_seconds"] = (_now() - modified).total_seconds()
        value["modified"] = modified.isoformat()
        return value

    def create(self, name: str, value: dict) -> bool:
        """Whether this call created the parameter (False: it exists, the service said so)."""
        kwargs = {"Name": name, "Value": json.dumps(value), "Type": "String", "Overwrite": False}
        return self._call("write", "put_parameter", "ParameterAlreadyExists", **kwargs) is not None

    def delete(self, name: str) -> bool:
        """Whether this call deleted the parameter (False: there was none)."""
        return self._call("delete", "delete_parameter", "ParameterNotFound", Name=name) is not None


def public(held: dict | None) -> dict | None:
    """A record as the run sees it: no internal fields but the age."""
    if held is None:
        return None
    return {k: v for k, v in held.items() if k != "modified"}


def check_break(module: AnsibleModule, held: dict) -> None:
    """Fail unless greeter_lock_break may break this lock: its run id, or stale and old enough."""
    wanted, bound = module.params["break_lock"], module.params["stale_after"]
    if wanted == "stale" and held["age_seconds"] > bound:
        return
    if wanted == held.get("run_id"):
        return
    if wanted == "stale":
        why = (
            f"greeter_lock_break=stale breaks only a lock older than greeter_lock_stale_after "
            f"({bound} s), and this one is {age_text(held['age_seconds'])} old"
        )
    else:
        why = f"greeter_lock_break={wanted} names another run than the one holding the lock"
    module.fail_json(
        msg=f"{why}: the fleet's deploy lock is held by {describe(held)}. Nothing was changed.",
        holder=public(held),
        held=False,
    )


def lost_to_break(module: AnsibleModule, ssm: Parameters, held: dict, other: dict) -> None:
    """Fail because another run is breaking the same lock: once its break ended, name the run
    that holds the lock then (the breaker, or a run that took it in the instant it was free)."""
    name = module.params["name"]
    deadline = time.monotonic() + CLAIM_WAIT_SECONDS
    while ssm.read(f"{name}-break") is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    now = ssm.read(name)
    if now is not None and now.get("run_id") != held.get("run_id"):
        module.fail_json(
            msg=(
                f"Another run broke the fleet's deploy lock (of run {held.get('run_id', '?')}) at "
                f"the same time: it is now held by {describe(now)}. Nothing was changed."
            ),
            holder=public(now),
            held=False,
        )
    module.fail_json(
        msg=(
            f"Run {other.get('run_id', '?')} is breaking the fleet's deploy lock right now "
            f"(the lock of run {other.get('breaking', '?')}, since {other.get('time', '?')}): "
            f"that run takes the lock, not this one. Nothing was changed."
        ),
        holder=public(held),
        held=False,
    )


def break_and_take(module: AnsibleModule, ssm: Parameters, held: dict, mine: dict) -> None:
    """Break `held` and take the lock, or fail: exactly one of two breakers gets here and wins."""
    name = module.params["name"]
    claim_name = f"{name}-break"
    claim = {"run_id": mine["run_id"], "breaking": held.get("run_id"), "time": mine["time"]}
    for attempt in range(2):
        if ssm.create(claim_name, claim):
            break
        other = ssm.read(claim_name)
        if other is None:
            continue  # that break ended between our create and our read
        if attempt == 0 and other["age_seconds"] > CLAIM_ABANDONED_SECONDS:
            ssm.delete(claim_name)  # left by a breaker that died: its break never happened
            continue
        lost_to_break(module, ssm, held, other)
    else:
        module.fail_json(msg=f"Could not claim the break of {name}; rerun. Nothing was changed.")
    try:
        again = ssm.read(name)
        if again is not None and (
            again.get("run_id") != held.get("run_id") or again["modified"] != held["modified"]
        ):
            module.fail_json(
                msg=(
                    f"The fleet's deploy lock changed while this run was breaking it: it is now "
                    f"held by {describe(again)}. Nothing was changed."
                ),
                holder=public(again),
                held=False,
            )
        if again is not None:
            ssm.delete(name)
        if not ssm.create(name, mine):
            now = ssm.read(name) or {}
            module.fail_json(
                msg=(
                    f"Another run took the fleet's deploy lock as this run broke it: it is held "
                    f"by {describe(now)}. Nothing was changed."
                ),
                holder=public(now),
                held=False,
            )
    finally:
        ssm.delete(claim_name)
    if again is None:  # its run released it meanwhile: nothing was broken
        module.exit_json(changed=True, held=True, holder=mine, broken=None, msg="")
    module.exit_json(
        changed=True,
        held=True,
        holder=mine,
        broken=public(held),
        msg=f"Broke the deploy lock of {describe(held)} "
        f"(greeter_lock_break={module.params['break_lock']}).",
    )


def take(module: AnsibleModule, ssm: Parameters, mine: dict) -> None:
    name, run_id = module.params["name"], module.params["run_id"]
    for _ in range(TAKE_ATTEMPTS):
        if ssm.create(name, mine):
            module.exit_json(changed=True, held=True, holder=mine, broken=None, msg="")
        held = ssm.read(name)
        if held is None:
            continue  # released between our create and our read: try again
        if held.get("run_id") == run_id:
            module.exit_json(changed=False, held=True, holder=public(held), broken=None, msg="")
        if module.params["break_lock"]:
            check_break(module, held)
            break_and_take(module, ssm, held, mine)
        bound = module.params["stale_after"]
        module.fail_json(
            msg=(
                f"Another run holds the fleet's deploy lock (SSM parameter {name}): "
                f"{describe(held)}. Nothing was changed. Wait for it to finish; if that run is "
                f"dead, rerun with -e greeter_lock_break={held.get('run_id', '?')} (or, once "
                f"the lock is older than greeter_lock_stale_after = {bound} s, "
                f"-e greeter_lock_break=stale)."
            ),
            holder=public(held),
            held=False,
        )
    module.fail_json(
        msg=f"The fleet's deploy lock {name} kept changing hands; rerun. Nothing was changed.",
        held=False,
    )


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "region": {"type": "str", "default": ""},
            "run_id": {"type": "str"},
            "state": {
                "type": "str",
                "choices": ["present", "held", "absent", "purged"],
                "default": "present",
            },
            "record": {"type": "dict", "default": {}},
            "break_lock": {"type": "str", "default": ""},
            "stale_after": {"type": "int", "default": 3600},
        },
        required_if=[
            ("state", "present", ["run_id"]),
            ("state", "held", ["run_id"]),
            ("state", "absent", ["run_id"]),
        ],
        supports_check_mode=False,
    )
    if boto3 is None:
        module.fail_json(msg=missing_required_lib("boto3"))
    run_id, wanted = module.params["run_id"], module.params["break_lock"]
    if not (wanted in ("", "stale") or RUN_ID.match(wanted)):
        module.fail_json(
            msg=(
                f"greeter_lock_break must be empty, 'stale' or the run id (16 hex digits) that "
                f"the refusal names, not '{wanted}'. Nothing was changed."
            )
        )
    if module.params["stale_after"] < 1:
        module.fail_json(
            msg=(
                f"greeter_lock_stale_after must be at least 1 (seconds), not "
                f"{module.params['stale_after']}. Nothing was changed."
            )
        )
    ssm = Parameters(module)
    name = module.params["name"]
    state = module.params["state"]
    if state == "purged":
        deleted = [ssm.delete(name), ssm.delete(f"{name}-break")]
        module.exit_json(changed=any(deleted), held=False, holder=None, msg="")
    if state == "present":
        mine = dict(
            module.params["record"],
            run_id=run_id,
            time=_now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        take(module, ssm, mine)
    held = ssm.read(name)
    ours = held is not None and held.get("run_id") == run_id
    if state == "absent":
        if ours:
            ssm.delete(name)  # SSM deletes unconditionally: the read just above is the check
        module.exit_json(changed=ours, held=False, holder=None if ours else public(held), msg="")
    msg = ""
    if not ours:
        msg = f"This run's deploy lock (run {run_id}, SSM parameter {name}) was broken: " + (
            f"it is now held by {describe(held)}" if held else "nobody holds it now"
        )
    module.exit_json(changed=False, held=ours, holder=public(held), msg=msg)


if __name__ == "__main__":
    main()
