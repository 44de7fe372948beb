"""Release the fleet's deploy lock at the end of a run whose finish step never ran.

The role takes the lock (roles/greeter/tasks/lock.yml) and its finish step releases it
(finish.yml), from the controller, on behalf of the hosts still in the play. When every host of
the play is lost (unreachable) or failed, Ansible runs no further task of that play and no
further play of the playbook: ansible-playbook ends the playbook as soon as a whole batch of a
play is gone. So neither the finish step nor a last play on localhost would release the lock,
and the next run would be refused by a lock that no live run holds. This hook sees every run to
its end (v2_playbook_on_stats), like greeter_outcome.

It acts only on what the run itself did: it remembers the lock that a greeter_lock task took
(state=present, held) and forgets it when a greeter_lock task released or purged it. A lock
still remembered at the end is released only if it is still this run's, as
``greeter_lock state=absent`` does: a lock broken by another run belongs to that run. A run
killed outright (SIGKILL, a lost controller) ends without this hook; its lock is broken by name
(greeter_lock_break). A failure here is a warning, never a change of the run's result.
"""

from __future__ import annotations

import json

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: greeter_lock_release
type: aggregate
short_description: release the greeter deploy lock a run took when its finish step never ran
description:
  - At the end of a playbook, release the SSM parameter deploy lock that a greeter_lock task of
    this run took and no greeter_lock task released, if this run still holds it.
requirements:
  - enabled in ansible.cfg (callbacks_enabled)
  - boto3
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "greeter_lock_release"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.held: dict | None = None  # name, region, run_id of the lock this run holds

    def v2_runner_on_ok(self, result) -> None:
        if not str(result._task.action).endswith("greeter_lock"):
            return
        args = result._result.get("invocation", {}).get("module_args", {})
        state = args.get("state", "present")
        if state == "present" and result._result.get("held"):
            self.held = {key: args.get(key) or "" for key in ("name", "region", "run_id")}
        elif state in ("absent", "purged") and self.held and args.get("name") == self.held["name"]:
            self.held = None

    def v2_playbook_on_stats(self, stats) -> None:
        if self.held is None:
            return
        name, run_id = self.held["name"], self.held["run_id"]
        try:
            import boto3  # noqa: PLC0415 -- only runs that kept a lock pay for the import

            ssm = boto3.client("ssm", region_name=self.held["region"] or None)
            try:
                value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
            except ssm.exceptions.ParameterNotFound:
                return
            try:
                holder = json.loads(value).get("run_id")
            except (ValueError, AttributeError):
                holder = None
            if holder != run_id:
                self._display.display(
                    f"greeter_lock_release: the deploy lock {name} is no longer run {run_id}'s "
                    f"(held by run {holder}); left as it is"
                )
                return
            ssm.delete_parameter(Name=name)  # SSM deletes unconditionally: the read is the check
            self._display.display(
                f"greeter_lock_release: released the fleet's deploy lock {name} of run {run_id}: "
                "no host was left to run the finish step"
            )
        except Exception as error:  # never let the release change the run's result
            self._display.warning(
                f"greeter_lock_release: could not release the deploy lock {name} of run "
                f"{run_id}: {error}. The next run names it; break it with "
                f"-e greeter_lock_break={run_id}"
            )
