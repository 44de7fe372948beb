#!/usr/bin/python
"""Report a balancer host's state in one module call: packages, managed files, the service.

As in the greeter role, a rerun that changes nothing is one round trip per host: the role
compares this answer with what it would write and acts only on what differs. What the two
roles' state reads share is module_utils/greeter_host.py (plugins/, through ansible.cfg).
"""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.greeter_host import file_state, missing_packages, os_release, unit_state

DOCUMENTATION = r"""
---
module: greeter_lb_info
short_description: Report the packages, files and service state of a greeter balancer host
description:
  - Which of O(packages) are not installed, the type, owner, group, mode and SHA-1 of each of
    O(files), the systemd state of O(unit), and C(/etc/os-release). Read-only; safe in check mode.
options:
  packages:
    description: Debian package names whose absence is reported in RV(missing_packages).
    type: list
    elements: str
    default: []
  files:
    description: Paths reported in RV(files).
    type: list
    elements: path
    default: []
  unit:
    description: systemd unit whose state is reported in RV(service).
    type: str
    default: haproxy.service
author: greeter project
"""

RETURN = r"""
missing_packages:
  description: Members of O(packages) that are not installed.
  returned: always
  type: list
  elements: str
files:
  description: C(state) (absent, file, directory, link, other), C(owner), C(group), C(mode),
    C(checksum).
  returned: always
  type: dict
service:
  description: C(ActiveState), C(UnitFileState), C(NeedDaemonReload), C(LoadState) of O(unit).
  returned: always
  type: dict
os:
  description: C(id), C(version_id) and C(codename) from /etc/os-release, C(python) the
    module's Python version.
  returned: always
  type: dict
"""


UNIT_PROPERTIES = "ActiveState,UnitFileState,NeedDaemonReload,LoadState"


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "packages": {"type": "list", "elements": "str", "default": []},
            "files": {"type": "list", "elements": "path", "default": []},
            "unit": {"type": "str", "default": "haproxy.service"},
        },
        supports_check_mode=True,
    )
    module.exit_json(
        changed=False,
        missing_packages=missing_packages(module, module.params["packages"]),
        files={path: file_state(module, path) for path in module.params["files"]},
        service=unit_state(module, module.params["unit"], UNIT_PROPERTIES),
        os=os_release(),
    )


if __name__ == "__main__":
    main()
