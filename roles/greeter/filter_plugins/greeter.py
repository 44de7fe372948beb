"""Filters of the greeter role."""

from __future__ import annotations

import hashlib
from pathlib import Path


def greeter_drift(wanted: dict[str, dict], actual: dict[str, dict]) -> list[str]:
    """Paths whose actual state differs from the wanted one in any key the wanted state names.

    ``wanted`` maps a path to what the role would make of it (state, owner, group, mode,
    checksum); ``actual`` is the ``files`` answer of greeter_release_info for the same paths.
    A path the state read did not cover counts as drifted, so the task runs rather than skips.
    """
    return [
        path
        for path, want in wanted.items()
        if any(str(actual.get(path, {}).get(key)) != str(value) for key, value in want.items())
    ]


def greeter_tls_wanted(files: list[dict], folder: str, group: str) -> list[tuple[str, dict]]:
    """(host path, wanted state) of each TLS file, its checksum read from the controller file.

    Only the SHA-1 leaves this function, never the content: keys stay out of variables and logs.
    """
    return [
        (
            f"{folder}/{item['dest']}",
            {
                "state": "file",
                "owner": item["owner"],
                "group": group if item["owner"] != "root" else "root",
                "mode": item["mode"],
                "checksum": hashlib.sha1(Path(item["src"]).read_bytes()).hexdigest(),  # noqa: S324
            },
        )
        for item in files
    ]


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict:
        return {"greeter_drift": greeter_drift, "greeter_tls_wanted": greeter_tls_wanted}
