#!/usr/bin/python
"""Hold a freshly started release under watch for a while: the bake window of the health gate.

A release that serves once and dies a few seconds later passes a one-shot health check; with
systemd restarting it, the next batch is well under way before anyone notices. This module
probes the service once a second for a given time, in one module run, and fails if one probe
fails or the service's main process changes (it died and systemd started it again).
"""

from __future__ import annotations

import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: greeter_bake
short_description: Check that a service keeps serving for a while (the bake window)
options:
  probe:
    description: Command (argv) that exits 0 while the service serves the expected release.
    type: list
    elements: str
    required: true
  seconds:
    description: How long the service must keep serving.
    type: int
    required: true
  unit:
    description: The systemd unit whose main process must not change meanwhile.
    type: str
    default: greeter.service
author: greeter project
"""

RETURN = r"""
probes:
  description: How many probes ran.
  returned: always
  type: int
"""


def _main_pid(module: AnsibleModule, unit: str) -> str:
    _, out, _ = module.run_command(["systemctl", "show", "--property=MainPID", "--value", unit])
    return out.strip()


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "probe": {"type": "list", "elements": "str", "required": True},
            "seconds": {"type": "int", "required": True},
            "unit": {"type": "str", "default": "greeter.service"},
        },
        supports_check_mode=True,
    )
    if module.check_mode:
        module.exit_json(changed=False, probes=0)
    unit, seconds = module.params["unit"], module.params["seconds"]
    pid = _main_pid(module, unit)
    started = time.monotonic()
    probes = 0
    while True:
        rc, out, err = module.run_command(module.params["probe"])
        probes += 1
        held = time.monotonic() - started
        now = _main_pid(module, unit)
        if rc != 0 or now != pid:
            why = (
                f"its main process changed ({pid} -> {now or 'none'})"
                if now != pid
                else (err or out).strip()
            )
            module.fail_json(
                msg=f"stopped serving {held:.1f} s into the {seconds} s bake window: {why}",
                probes=probes,
            )
        if held >= seconds:
            break
        time.sleep(1)
    module.exit_json(changed=False, probes=probes)


if __name__ == "__main__":
    main()
