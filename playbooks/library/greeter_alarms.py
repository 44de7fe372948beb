#!/usr/bin/python
"""Make a stack's CloudWatch metric alarms exactly a given list, in one module run.

amazon.aws.cloudwatch_metric_alarm handles one alarm per run: a loop over a fleet's alarms is
one module start per alarm (three per instance here), which made the alarms play the longest
part of a first deploy at scale (498 s of a 12-host ``site.yml`` on a loaded machine, issue 23).
This module reads every alarm under a prefix once (DescribeAlarms, paginated), puts only the
alarms that are missing or differ (PutMetricAlarm, the same call that module makes) and deletes
the ones under the prefix no longer wanted (DeleteAlarms, 100 names per call). A rerun with
nothing to do is one read. Region, credentials and endpoint come the standard way (``region``,
else AWS_REGION or the profile; AWS_ENDPOINT_URL in tests).
"""

from __future__ import annotations

from typing import Any

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
module: greeter_alarms
short_description: Make the CloudWatch metric alarms under a name prefix exactly a given list
description:
  - Reads the metric alarms whose names start with O(prefix) once, puts each alarm of O(alarms)
    that is missing or differs, and with O(purge) deletes the alarms under O(prefix) that
    O(alarms) does not name. An alarm already as wanted costs no call.
  - Supports check mode and diff mode (the alarm names before and after, an updated one marked).
options:
  prefix:
    description: The alarms this module owns, e.g. C(<stack>/); every name in O(alarms) has it.
    type: str
    required: true
  alarms:
    description: The wanted alarms, each as PutMetricAlarm takes it (snake_case keys).
    type: list
    elements: dict
    default: []
    suboptions:
      name: {description: The alarm's name., type: str, required: true}
      description: {description: Its description., type: str, default: ""}
      namespace: {description: The metric's namespace., type: str, required: true}
      metric_name: {description: The metric., type: str, required: true}
      statistic: {description: Average, Minimum, Maximum or Sum., type: str, required: true}
      comparison: {description: The ComparisonOperator., type: str, required: true}
      threshold: {description: The threshold., type: float, required: true}
      period: {description: Seconds per period., type: int, required: true}
      evaluation_periods: {description: Periods to evaluate., type: int, required: true}
      treat_missing_data:
        description: What missing data means.
        type: str
        choices: [breaching, notBreaching, ignore, missing]
        default: missing
      unit: {description: The metric's unit., type: str}
      dimensions: {description: The metric's dimensions (name to value)., type: dict, default: {}}
      alarm_actions:
        description: ARNs notified or acted on in ALARM.
        type: list
        elements: str
        default: []
  purge:
    description: Delete the alarms under O(prefix) that O(alarms) does not name.
    type: bool
    default: true
  region:
    description: AWS region; empty takes the standard resolution (AWS_REGION, the profile).
    type: str
    default: ""
requirements: [boto3]
author: greeter project
"""

RETURN = r"""
created:
  description: The alarms put that did not exist (or would be, in check mode).
  returned: always
  type: list
  elements: str
updated:
  description: The alarms put again because they differed.
  returned: always
  type: list
  elements: str
deleted:
  description: The alarms deleted.
  returned: always
  type: list
  elements: str
"""

ALARM_SPEC: dict[str, dict[str, Any]] = {
    "name": {"type": "str", "required": True},
    "description": {"type": "str", "default": ""},
    "namespace": {"type": "str", "required": True},
    "metric_name": {"type": "str", "required": True},
    "statistic": {"type": "str", "required": True},
    "comparison": {"type": "str", "required": True},
    "threshold": {"type": "float", "required": True},
    "period": {"type": "int", "required": True},
    "evaluation_periods": {"type": "int", "required": True},
    "treat_missing_data": {
        "type": "str",
        "choices": ["breaching", "notBreaching", "ignore", "missing"],
        "default": "missing",
    },
    "unit": {"type": "str"},
    "dimensions": {"type": "dict", "default": {}},
    "alarm_actions": {"type": "list", "elements": "str", "default": []},
}

# What PutMetricAlarm leaves at its defaults when the call does not set them: an existing alarm
# with any of these set differs from what this module would put.
UNSET = {
    "OKActions": [],
    "InsufficientDataActions": [],
    "ExtendedStatistic": None,
    "DatapointsToAlarm": None,
    "EvaluateLowSampleCountPercentile": None,
    "ThresholdMetricId": None,
    "Metrics": [],
}


def put_arguments(alarm: dict[str, Any]) -> dict[str, Any]:
    """PutMetricAlarm's arguments for one wanted alarm (the module's suboptions)."""
    arguments = {
        "AlarmName": alarm["name"],
        "AlarmDescription": alarm["description"],
        "Namespace": alarm["namespace"],
        "MetricName": alarm["metric_name"],
        "Statistic": alarm["statistic"],
        "ComparisonOperator": alarm["comparison"],
        "Threshold": float(alarm["threshold"]),
        "Period": int(alarm["period"]),
        "EvaluationPeriods": int(alarm["evaluation_periods"]),
        "TreatMissingData": alarm["treat_missing_data"],
        "Dimensions": [
            {"Name": str(name), "Value": str(value)}
            for name, value in sorted(alarm["dimensions"].items())
        ],
        "AlarmActions": list(alarm["alarm_actions"]),
    }
    if alarm.get("unit"):
        arguments["Unit"] = alarm["unit"]
    return arguments


def in_place(wanted: dict[str, Any], found: dict[str, Any]) -> bool:
    """Whether DescribeAlarms' `found` already is `wanted` (PutMetricAlarm's arguments)."""
    have = {key: found.get(key) for key in wanted}
    have["Threshold"] = float(found.get("Threshold", "nan"))
    have["Dimensions"] = sorted(
        ({"Name": d["Name"], "Value": d["Value"]} for d in found.get("Dimensions", [])),
        key=lambda d: (d["Name"], d["Value"]),
    )
    have["TreatMissingData"] = found.get("TreatMissingData") or "missing"
    unset_ok = all((found.get(key) or default) == default for key, default in UNSET.items())
    return unset_ok and have == wanted and (found.get("Unit") or None) == wanted.get("Unit")


class Alarms:
    """The three CloudWatch calls this module makes, each failing the run with what it was doing."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.client = boto3.client(
            "cloudwatch", region_name=module.params["region"] or None, config=CLIENT_CONFIG
        )

    def _fail(self, what: str, error: Exception) -> None:
        self.module.fail_json(msg=f"Could not {what}: {error}", exception=repr(error))

    def under(self, prefix: str) -> dict[str, dict[str, Any]]:
        try:
            pages = self.client.get_paginator("describe_alarms").paginate(
                AlarmNamePrefix=prefix, AlarmTypes=["MetricAlarm"]
            )
            return {a["AlarmName"]: a for page in pages for a in page.get("MetricAlarms", [])}
        except (BotoCoreError, ClientError) as error:
            self._fail(f"read the alarms under {prefix}", error)
            return {}

    def put(self, arguments: dict[str, Any]) -> None:
        try:
            self.client.put_metric_alarm(**arguments)
        except (BotoCoreError, ClientError) as error:
            self._fail(f"put the alarm {arguments['AlarmName']}", error)

    def delete(self, names: list[str]) -> None:
        for start in range(0, len(names), 100):  # DeleteAlarms takes at most 100 names
            try:
                self.client.delete_alarms(AlarmNames=names[start : start + 100])
            except (BotoCoreError, ClientError) as error:
                self._fail(f"delete the alarms {', '.join(names[start : start + 100])}", error)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "prefix": {"type": "str", "required": True},
            "alarms": {"type": "list", "elements": "dict", "default": [], "options": ALARM_SPEC},
            "purge": {"type": "bool", "default": True},
            "region": {"type": "str", "default": ""},
        },
        supports_check_mode=True,
    )
    if boto3 is None:
        module.fail_json(msg=missing_required_lib("boto3"))
    prefix = module.params["prefix"]
    wanted = [put_arguments(alarm) for alarm in module.params["alarms"]]
    names = [w["AlarmName"] for w in wanted]
    outside = [name for name in names if not name.startswith(prefix)]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if not prefix or outside or duplicates:
        module.fail_json(
            msg=(
                f"Every alarm name must start with the prefix {prefix!r} and appear once: "
                f"outside it {outside}, twice {duplicates}. Nothing was changed."
            )
        )
    cloudwatch = Alarms(module)
    existing = cloudwatch.under(prefix)
    created = sorted(w["AlarmName"] for w in wanted if w["AlarmName"] not in existing)
    updated = sorted(
        w["AlarmName"]
        for w in wanted
        if w["AlarmName"] in existing and not in_place(w, existing[w["AlarmName"]])
    )
    deleted = sorted(set(existing) - set(names)) if module.params["purge"] else []
    if not module.check_mode:
        for arguments in wanted:
            if arguments["AlarmName"] in created or arguments["AlarmName"] in updated:
                cloudwatch.put(arguments)
        cloudwatch.delete(deleted)
    # The diff names the alarms before and after; one put again shows as a changed line.
    after = sorted((set(existing) - set(deleted)) | set(names))
    after = [f"{name} (updated)" if name in updated else name for name in after]
    module.exit_json(
        changed=bool(created or updated or deleted),
        created=created,
        updated=updated,
        deleted=deleted,
        diff={"before": "\n".join(sorted(existing)) + "\n", "after": "\n".join(after) + "\n"},
    )


if __name__ == "__main__":
    main()
