"""Filters of the greeter role."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import importlib.util
import json
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path

from ansible.errors import AnsibleFilterError


def _load_redact():
    """The role's module_utils/greeter_redact.py, which its modules use too: one rule for both."""
    path = Path(__file__).resolve().parents[1] / "module_utils" / "greeter_redact.py"
    spec = importlib.util.spec_from_file_location("_greeter_redact", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_redact = _load_redact()


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


RELEASE_ID = re.compile(r"^[0-9a-f]{40}-[0-9a-f]{12}$")


def greeter_probe_release(stdout: str) -> str:
    """The release (<commit>-<config digest>) that `greeter probe --json` says a server runs.

    What the running process itself reports (GetVersion), so it tells a process started from
    another release apart from the one `current` names (a run killed between the switch and the
    restart). Empty when the output is not the probe's JSON (it could not run, or printed an error).
    """
    try:
        rows = json.loads(stdout or "[]")
        return str(rows[0].get("release") or "")
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        return ""


def greeter_fleet(hosts: list, lost: list[str]) -> dict[str, str]:
    """What each host serves at the end of a run: host name -> release, or why there is none.

    ``hosts`` are the hostvars of the play's hosts. A host in sync was probed by the run's own
    state read, which found its process running the wanted release; any other host by the
    finish step's probe (``_greeter_now``, ``greeter probe --json``); a lost host could not be
    asked. A release is (commit, configuration): ``<commit>-<config digest>``.
    """
    fleet = {}
    for host in hosts:
        name = host["inventory_hostname"]
        probed = host.get("_greeter_now") or {}
        if name in lost:
            fleet[name] = "unknown (lost)"
        elif host.get("_greeter_in_sync"):
            fleet[name] = host["_greeter_release_id"]
        elif probed.get("rc") == 0:
            served = greeter_probe_release(probed["stdout"])
            fleet[name] = served or "a server that names no release"
        else:
            fleet[name] = "nothing (does not serve)"
    return fleet


def greeter_fleet_split(fleet: dict[str, str], hosts: list) -> bool:
    """Whether the fleet does not serve one release: the finish step's final check.

    Split when a host serves no release (lost, down), when the hosts run different commits, or
    when two hosts that this run gives the same configuration (the same wanted release) serve
    different releases, such as one host on a new configuration and one on the old. Hosts whose
    configuration differs by design (their own TLS certificate) are each a release of their own;
    for them the commit is what must agree.
    """
    served = list(fleet.values())
    if not served or not all(RELEASE_ID.match(release) for release in served):
        return True
    if len({release[:40] for release in served}) != 1:
        return True
    by_wanted: dict[str, set[str]] = {}
    for host in hosts:
        name = host["inventory_hostname"]
        if name in fleet:
            wanted = host.get("_greeter_release_id") or ""
            by_wanted.setdefault(wanted, set()).add(fleet[name])
    return any(len(releases) != 1 for releases in by_wanted.values())


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


def greeter_redact_url(value: object) -> object:
    """`value` with the user-info of every URL in it replaced by *** (a string, or each string of
    a list): https://user:TOKEN@host/x.git -> https://***@host/x.git. Anything else is returned
    as it is."""
    if isinstance(value, str):
        return _redact.redact_url(value)
    if isinstance(value, list):
        return [greeter_redact_url(item) for item in value]
    return value


# The release key's length when the role makes it, and the least it accepts in a file of yours.
_KEY_BYTES = 32


def _release_key(key_file: str) -> bytes:
    """The fleet's release key, read from `key_file` on the controller, made on first use.

    Made race-free: several runs may start at once (the tests run deploys from several labs), so
    the key is written to a private temporary file and hard-linked into place, which fails if
    another run got there first; every run then reads the one file that won."""
    path = Path(key_file).expanduser()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".release-key-")  # 0600
        try:
            os.write(fd, f"{secrets.token_hex(_KEY_BYTES)}\n".encode())
            os.fsync(fd)
            os.close(fd)
            with contextlib.suppress(FileExistsError):  # another run made it: theirs is the key
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    try:
        info = path.stat()
        key = path.read_bytes().strip()
    except OSError as error:
        raise AnsibleFilterError(
            f"greeter_release_key_file: cannot read {path}: {error.strerror}. Nothing was changed."
        ) from error
    if info.st_mode & 0o077:
        raise AnsibleFilterError(
            f"greeter_release_key_file: {path} must be readable by its owner only (mode 0600), "
            f"it is {info.st_mode & 0o777:04o}: chmod 600 it. Nothing was changed."
        )
    if len(key) < _KEY_BYTES:
        raise AnsibleFilterError(
            f"greeter_release_key_file: {path} must hold a key of at least {_KEY_BYTES} "
            f"characters, it holds {len(key)} (remove the file and the role makes one). "
            "Nothing was changed."
        )
    return key


def greeter_release_key_ready(key_file: str) -> bool:
    """True once the release key exists and only its owner can read it (made on first use);
    an error naming greeter_release_key_file otherwise. The preflight asks this before any host
    is touched."""
    _release_key(key_file)
    return True


def greeter_config_digest(config: dict, key_file: str) -> str:
    """The digest that names a release's configuration: HMAC-SHA256 of the configuration (each
    file's state and checksum, as the role would write it) under the fleet's release key.

    The release id (<commit>-<digest>) is shown to every client (GetVersion) and the
    configuration holds greeter_extra_env values: a plain hash of it would let anyone check
    guesses at those values. Keyed, it tells nothing to whoever lacks the key, and stays the
    same for the same configuration as long as the key file does."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hmac.new(_release_key(key_file), canonical.encode(), hashlib.sha256).hexdigest()


class FilterModule:
    """Ansible's entry point for filter plugins."""

    def filters(self) -> dict:
        return {
            "greeter_tls_wanted": greeter_tls_wanted,
            "greeter_fleet": greeter_fleet,
            "greeter_fleet_split": greeter_fleet_split,
            "greeter_probe_release": greeter_probe_release,
            "greeter_batches": greeter_batches,
            "greeter_run_identity": greeter_run_identity,
            "greeter_redact_url": greeter_redact_url,
            "greeter_release_key_ready": greeter_release_key_ready,
            "greeter_config_digest": greeter_config_digest,
        }
