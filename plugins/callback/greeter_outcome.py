"""Publish one message per deploy or rollback to the stack's SNS topic, also when the run fails.

A callback and not a last play: ansible-playbook runs no further play once a play's hosts have
all failed or a batch broke max_fail_percentage, which is exactly when people must hear of it.
This hook sees every run to its end (v2_playbook_on_stats) whatever happened before.

It acts only for playbooks/deploy.yml, playbooks/rollback.yml and site.yml, and only when the
topic <stack>-events exists (playbooks/alarms.yml creates it). What it reports, all read from
the run itself:

* hosts switched: hosts whose ``current`` link the role changed once in this run (they serve
  the new release); hosts rolled back: hosts whose link was changed and put back (the role's
  rescue, or a revert of a stopped run). Read from the link writes, not from which host Ansible
  marked failed, so it holds however the deploy plays report a failure;
* outcome: ``succeeded`` (nothing failed), ``failed and rolled back`` (something failed and every
  host that switched was put back), otherwise ``failed`` (nothing switched, or some hosts remain
  on the new release);
* version: greeter_version (or greeter_rollback_to) as given, and the releases switched to.

The stack and region are greeter_stack_name / greeter_stack_region when given with -e, else
GREETER_STACK_NAME and the region the inventory reads (the greeter_aws_region lookup: AWS_REGION,
AWS_DEFAULT_REGION, the AWS profile's). boto3 finds credentials and endpoint the standard way.
A failure to publish is a warning: it never changes the run's result.
"""

from __future__ import annotations

import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: greeter_outcome
type: notification
short_description: publish each deploy's and rollback's outcome to the stack's SNS topic
description:
  - At the end of playbooks/deploy.yml, playbooks/rollback.yml and site.yml, publish one message
    (stack, version, hosts switched, outcome) to the SNS topic <stack>-events if it exists.
requirements:
  - enabled in ansible.cfg (callbacks_enabled)
  - boto3
"""

PLAYBOOKS = {"deploy.yml": "deploy", "site.yml": "deploy", "rollback.yml": "rollback"}
FILE_ACTIONS = {"file", "ansible.builtin.file", "ansible.legacy.file"}


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "greeter_outcome"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.extra_vars: dict = {}
        self.switches: dict[str, list[str]] = {}  # host -> releases its current link was set to
        self.failed: set[str] = set()

    def v2_playbook_on_start(self, playbook) -> None:
        self.action = PLAYBOOKS.get(os.path.basename(playbook._file_name))

    def v2_playbook_on_play_start(self, play) -> None:
        if not self.extra_vars:
            self.extra_vars = dict(play.get_variable_manager().extra_vars)

    def v2_runner_on_ok(self, result) -> None:
        outcome = result._result
        if (
            result._task.action in FILE_ACTIONS
            and outcome.get("changed")
            and str(outcome.get("dest", "")).endswith("/current")
        ):
            release = os.path.basename(str(outcome.get("src", "")).rstrip("/"))
            self.switches.setdefault(result._host.get_name(), []).append(release)

    def v2_runner_on_failed(self, result, ignore_errors: bool = False) -> None:
        if not ignore_errors:
            self.failed.add(result._host.get_name())

    def v2_runner_on_unreachable(self, result) -> None:
        self.failed.add(result._host.get_name())

    def v2_playbook_on_stats(self, stats) -> None:
        if self.action is None:
            return
        stack = str(self._var("greeter_stack_name", "GREETER_STACK_NAME", "greeter"))
        failed = self.failed | {host for host, count in stats.failures.items() if count}
        failed |= {host for host, count in stats.dark.items() if count}
        subject, message = self.compose(stack, sorted(failed))
        try:
            import boto3  # noqa: PLC0415 -- only runs that notify pay for the import

            sns = boto3.client("sns", region_name=self._region())
            topic = self.find_topic(sns, f"{stack}-events")
            if topic is None:
                self._display.vv(f"greeter_outcome: no topic {stack}-events; nothing published")
                return
            sns.publish(TopicArn=topic, Subject=subject, Message=message)
            self._display.display(f"greeter_outcome: published to {topic}: {subject}")
        except Exception as error:  # never let the notice change the run's result
            self._display.warning(f"greeter_outcome: could not publish the outcome: {error}")

    def _region(self) -> str:
        if self.extra_vars.get("greeter_stack_region"):
            return str(self.extra_vars["greeter_stack_region"])
        from ansible.plugins.loader import lookup_loader  # noqa: PLC0415 -- as for boto3

        return lookup_loader.get("greeter_aws_region").run([])[0]

    def _var(self, name: str, env: str, default: str) -> str:
        return self.extra_vars.get(name) or os.environ.get(env) or default

    def compose(self, stack: str, failed: list[str]) -> tuple[str, str]:
        """The subject and text of the message (plain "key: value" lines, for mail and tests)."""
        # One write: switched. Two: switched, then put back where it was.
        switched = sorted(host for host, writes in self.switches.items() if len(writes) % 2)
        rolled_back = sorted(host for host in self.switches if host not in switched)
        if not failed:
            outcome = "succeeded"
        elif rolled_back and not switched:
            outcome = "failed and rolled back"
        else:
            outcome = "failed"
        if self.action == "rollback":
            asked = self.extra_vars.get("greeter_rollback_to") or "previous"
        else:
            asked = self.extra_vars.get("greeter_version") or "default (greeter_version)"
        releases = sorted({self.switches[host][-1] for host in switched})
        lines = [
            f"stack: {stack}",
            f"action: {self.action}",
            f"version: {asked}",
            f"releases: {', '.join(releases) or '-'}",
            f"outcome: {outcome}",
            f"hosts switched: {', '.join(switched) or 'none'}",
            f"hosts rolled back: {', '.join(rolled_back) or 'none'}",
            f"hosts failed: {', '.join(failed) or 'none'}",
        ]
        return f"greeter {stack}: {self.action} {outcome}"[:100], "\n".join(lines) + "\n"

    @staticmethod
    def find_topic(sns, name: str) -> str | None:
        for page in sns.get_paginator("list_topics").paginate():
            for topic in page["Topics"]:
                if topic["TopicArn"].rsplit(":", 1)[-1] == name:
                    return topic["TopicArn"]
        return None
