#!/usr/bin/python
"""Wait until a host's first boot is done: cloud-init finished, dpkg's locks free.

On a fresh cloud instance SSH answers while cloud-init still creates users and writes
configuration, and apt-daily, unattended-upgrades or cloud-init's own package upgrades hold
dpkg's lock for minutes. An apt run started then fails with "Could not get lock
/var/lib/dpkg/lock-frontend". This module waits, bounded, and names what was still busy when the
bound ran out. It changes nothing.
"""

from __future__ import annotations

import json
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.greeter_boot import cloud_init_state, dpkg_lock_holders

DOCUMENTATION = r"""
---
module: greeter_boot_wait
short_description: Wait for cloud-init to finish and for dpkg's locks to be free
description:
  - Polls cloud-init's run folder until this boot's C(result.json) exists (skipped when
    cloud-init does not run), then C(/proc/locks) until nobody holds dpkg's C(lock-frontend)
    or C(lock), for at most O(timeout) seconds in all. Read-only; safe in check mode.
options:
  timeout:
    description: Seconds to wait in all before failing with what is still busy.
    type: int
    required: true
  dpkg_lock:
    description: Whether to wait for dpkg's locks too (only a host that will run apt needs them).
    type: bool
    default: true
author: greeter project
"""

RETURN = r"""
waited:
  description: Seconds spent waiting for C(cloud_init) and for C(dpkg_lock).
  returned: always
  type: dict
cloud_init_errors:
  description: The errors cloud-init reported for this boot (its C(result.json)), if any.
  returned: always
  type: list
"""

POLL_SECONDS = 0.5


def cloud_init_errors() -> list:
    try:
        with open("/run/cloud-init/result.json", encoding="utf-8") as handle:
            return json.load(handle).get("v1", {}).get("errors", [])
    except (OSError, ValueError):
        return []


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "timeout": {"type": "int", "required": True},
            "dpkg_lock": {"type": "bool", "default": True},
        },
        supports_check_mode=True,
    )
    timeout = module.params["timeout"]
    started = time.monotonic()

    def waited(cloud_init: float | None = None) -> dict:
        """Seconds spent on each wait so far (cloud_init: when that wait ended)."""
        now = round(time.monotonic() - started, 1)
        if cloud_init is None:
            return {"cloud_init": now, "dpkg_lock": 0.0}
        return {"cloud_init": cloud_init, "dpkg_lock": round(now - cloud_init, 1)}

    while cloud_init_state() == "running":
        if time.monotonic() - started > timeout:
            module.fail_json(
                msg=f"cloud-init had not finished the host's boot after {timeout} s "
                "(greeter_boot_timeout); `cloud-init status --long` on the host says why",
                waited=waited(),
            )
        time.sleep(POLL_SECONDS)
    cloud_init_done = waited()["cloud_init"]
    holders = dpkg_lock_holders() if module.params["dpkg_lock"] else []
    while holders:
        if time.monotonic() - started > timeout:
            module.fail_json(
                msg=f"dpkg's lock (/var/lib/dpkg/lock-frontend, /var/lib/dpkg/lock) was still "
                f"held after {timeout} s (greeter_boot_timeout) by {', '.join(holders)}: apt-daily "
                "or unattended-upgrades, say; let it finish, or stop it, and rerun",
                waited=waited(cloud_init_done),
            )
        time.sleep(POLL_SECONDS)
        holders = dpkg_lock_holders()
    module.exit_json(
        changed=False, waited=waited(cloud_init_done), cloud_init_errors=cloud_init_errors()
    )


if __name__ == "__main__":
    main()
