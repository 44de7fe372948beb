"""Filters of playbooks/alarms.yml."""

from __future__ import annotations

from typing import Any

# Everything amazon.aws.cloudwatch_metric_alarm compares (it puts an alarm again when any of these
# differ), with the values the playbook leaves at the module's defaults.
UNSET = {
    "ok_actions": [],
    "insufficient_data_actions": [],
    "extended_statistic": None,
    "datapoints_to_alarm": None,
    "evaluate_low_sample_count_percentile": None,
    "threshold_metric_id": None,
}


def _dimensions(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((str(name), str(value)) for name, value in pairs)


def greeter_instance_alarms(
    checks: dict[str, dict[str, Any]], instances: dict[str, str], stack: str, topic: str
) -> list[dict[str, Any]]:
    """One alarm per instance (host name -> instance id) and check, as the module's arguments:
    the check's own, named <stack>/<host>/<check>, watching that instance, the topic added to
    its actions. A filter because Jinja has no way to build a dict per pair of a product."""
    return [
        check
        | {
            "name": f"{stack}/{host}/{name}",
            "description": f"{host}: {check['description']}",
            "dimensions": {"InstanceId": instance},
            "alarm_actions": [*check["alarm_actions"], topic],
        }
        for host, instance in sorted(instances.items())
        for name, check in checks.items()
    ]


def greeter_alarm_in_place(wanted: dict[str, Any], existing: list[dict[str, Any]]) -> bool:
    """Whether CloudWatch already holds `wanted` (the module's arguments) exactly, judged from
    cloudwatch_metric_alarm_info's `metric_alarms`: such an alarm needs no module run at all,
    which is what makes a rerun of the alarms cheap (one read, not one call per alarm)."""
    found = next((a for a in existing if a.get("alarm_name") == wanted["name"]), None)
    if found is None:
        return False
    want = {
        "alarm_description": wanted["description"],
        "metric_name": wanted["metric_name"],
        "namespace": wanted["namespace"],
        "statistic": wanted["statistic"],
        "comparison_operator": wanted["comparison"],
        "threshold": float(wanted["threshold"]),
        "period": int(wanted["period"]),
        "evaluation_periods": int(wanted["evaluation_periods"]),
        "unit": wanted["unit"],
        "dimensions": _dimensions(list(wanted["dimensions"].items())),
        "alarm_actions": list(wanted["alarm_actions"]),
        "treat_missing_data": wanted.get("treat_missing_data", "missing"),
        **UNSET,
    }
    have = {key: found.get(key) for key in want}
    have["threshold"] = float(found.get("threshold", "nan"))
    have["dimensions"] = _dimensions([(d["name"], d["value"]) for d in found.get("dimensions", [])])
    have["treat_missing_data"] = found.get("treat_missing_data") or "missing"
    for key, default in UNSET.items():
        have[key] = found.get(key) or default
    return have == want


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict:
        return {
            "greeter_instance_alarms": greeter_instance_alarms,
            "greeter_alarm_in_place": greeter_alarm_in_place,
        }
