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
        return {"greeter_alarm_in_place": greeter_alarm_in_place}
