"""Filters both roles use on their state reads (greeter_release_info, greeter_lb_info)."""

from __future__ import annotations


def greeter_drift(wanted: dict[str, dict], actual: dict[str, dict]) -> list[str]:
    """Paths whose actual state differs from the wanted one in any key the wanted state names.

    ``wanted`` maps a path to what the role would make of it (state, owner, group, mode,
    checksum); ``actual`` is the state read's ``files`` answer for the same paths. A path the
    state read did not cover counts as drifted, so the task runs rather than skips.
    """
    return [
        path
        for path, want in wanted.items()
        if any(str(actual.get(path, {}).get(key)) != str(value) for key, value in want.items())
    ]


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict:
        return {"greeter_drift": greeter_drift}
