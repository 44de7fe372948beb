"""Filters of the greeter role."""

from __future__ import annotations

import getpass
import hashlib
import json
import secrets
import socket
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


def greeter_fleet(hosts: list, lost: list[str]) -> dict[str, str]:
    """What each host serves at the end of a run: host name -> commit, or why there is none.

    ``hosts`` are the hostvars of the play's hosts. A host in sync was probed by the run's own
    state read; any other host by the finish step's probe (``_greeter_now``, ``greeter probe
    --json``); a lost host could not be asked.
    """
    fleet = {}
    for host in hosts:
        name = host["inventory_hostname"]
        probed = host.get("_greeter_now") or {}
        if name in lost:
            fleet[name] = "unknown (lost)"
        elif host.get("_greeter_in_sync"):
            fleet[name] = host["_greeter_commit"]
        elif probed.get("rc") == 0:
            fleet[name] = json.loads(probed["stdout"])[0]["commit"]
        else:
            fleet[name] = "nothing (does not serve)"
    return fleet


def greeter_batches(hosts: list[str], serial: int | str | list) -> list[list[str]]:
    """Split hosts into rolling batches the way Ansible's ``serial`` does.

    ``serial`` is a count, a percentage of all the hosts ("50%") or a list of those, the last
    repeated until every host has its batch; a batch has at least one host.
    """
    sizes = serial if isinstance(serial, list) else [serial]
    if not sizes:
        sizes = [len(hosts) or 1]
    batches, start, index = [], 0, 0
    while start < len(hosts):
        size = str(sizes[min(index, len(sizes) - 1)]).strip()
        percent = size.endswith("%")
        count = max(int(len(hosts) * float(size[:-1]) / 100) if percent else int(size), 1)
        batches.append(hosts[start : start + count])
        start += count
        index += 1
    return batches


def greeter_run_identity(version: str) -> dict[str, str]:
    """Who runs this deploy, from where, of what: the holder record of the deploy lock.

    Read in the controller's own process (no lookup spawning a shell), with a random run id
    (16 hex digits) that tells this run's lock from any other's: a refused run names it, and
    ``greeter_lock_break=<run id>`` breaks that run's lock; the history's ``run`` field holds it.
    """
    return {
        "run_id": secrets.token_hex(8),
        "user": getpass.getuser(),
        "controller": socket.gethostname(),
        "version": version,
    }


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict:
        return {
            "greeter_drift": greeter_drift,
            "greeter_tls_wanted": greeter_tls_wanted,
            "greeter_fleet": greeter_fleet,
            "greeter_batches": greeter_batches,
            "greeter_run_identity": greeter_run_identity,
        }
