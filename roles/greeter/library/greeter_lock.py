#!/usr/bin/python
"""Take, release or break the fleet's deploy lock: one folder, created by an atomic rename.

Two runs must never change the same fleet at once (Kamal's ``kamal lock``, CodeDeploy's one
deployment per group). The lock is a folder on one host: a run writes its holder record into a
folder of its own, then renames that folder to the lock's name. ``rename`` onto an existing,
non-empty folder fails, so of two runs started in the same instant exactly one gets the lock,
and the loser reads who holds it. Nothing but a rename decides, so it works the same on any host.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: greeter_lock
short_description: Take, release or break the deploy lock of a greeter fleet
description:
  - O(state=present) takes the lock at O(path) for O(token) (a run's own random id), or fails
    naming the holder (user, controller, version, start time) when another run holds it.
  - O(state=absent) releases it if O(token) holds it; a lock held by another run is left alone.
  - O(force=true) with O(state=present) breaks a lock held by another run (a run that was
    killed), reporting whom it took it from.
options:
  path:
    description: The lock folder.
    type: path
    required: true
  token:
    description: The id of this run.
    type: str
    required: true
  state:
    description: Whether this run should hold the lock.
    type: str
    choices: [present, absent]
    default: present
  holder:
    description: What a refused run is told about this one (user, controller, version, started).
    type: dict
    default: {}
  force:
    description: Break a lock that another run holds.
    type: bool
    default: false
author: greeter project
"""

RETURN = r"""
holder:
  description: The holder record of the lock now (or of the run that holds it, on refusal).
  returned: always
  type: dict
broken:
  description: The holder record of a lock that O(force) broke, or null.
  returned: always
  type: dict
"""

RECORD = "holder.json"


def _read(path: str) -> dict:
    try:
        with open(os.path.join(path, RECORD), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _take(path: str, token: str, holder: dict) -> bool:
    """Whether this run got the lock: write the record aside, then rename it into place."""
    staging = f"{path}.{token}"
    os.makedirs(staging, mode=0o700, exist_ok=True)
    with open(os.path.join(staging, RECORD), "w", encoding="utf-8") as handle:
        json.dump(dict(holder, token=token), handle)
    try:
        os.rename(staging, path)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "token": {"type": "str", "required": True, "no_log": False},
            "state": {"type": "str", "choices": ["present", "absent"], "default": "present"},
            "holder": {"type": "dict", "default": {}},
            "force": {"type": "bool", "default": False},
        },
        supports_check_mode=False,
    )
    path, token = module.params["path"], module.params["token"]
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    current = _read(path) if os.path.isdir(path) else None
    if module.params["state"] == "absent":
        if current is not None and current.get("token") == token:
            shutil.rmtree(path)
        module.exit_json(changed=False, holder=current or {}, broken=None)
    if current is not None and current.get("token") == token:
        module.exit_json(changed=False, holder=current, broken=None)
    broken = None
    if current is not None and module.params["force"]:
        aside = f"{path}.broken.{token}"
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        broken = current
    if not _take(path, token, module.params["holder"]):
        held = _read(path)
        module.fail_json(
            msg=(
                "Another deploy holds the fleet's lock: {user} on {controller}, version {version}, "
                "started {started}. Nothing was changed. If that run is dead, rerun with "
                "-e greeter_lock_break=true to break its lock ({path})."
            ).format(
                path=path,
                **{key: held.get(key, "?") for key in ("user", "controller", "version", "started")},
            ),
            holder=held,
        )
    module.exit_json(changed=False, holder=_read(path), broken=broken)


if __name__ == "__main__":
    main()
