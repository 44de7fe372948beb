"""Filters of playbooks/alarms.yml."""

from __future__ import annotations

from typing import Any


def greeter_instance_alarms(
    checks: dict[str, dict[str, Any]], instances: dict[str, str], stack: str, topic: str
) -> list[dict[str, Any]]:
    """One alarm per instance (host name -> instance id) and check, as greeter_alarms takes them:
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


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict:
        return {
            "greeter_instance_alarms": greeter_instance_alarms,
        }
