#!/usr/bin/python
"""Report a balancer host's state in one module call: packages, managed files, the service.

As in the greeter role, a rerun that changes nothing is one round trip per host: the role
compares this answer with what it would write and acts only on what differs.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from ansible.module_utils.basic import AnsibleModule

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
  description: C(id), C(version_id) and C(codename) from /etc/os-release.
  returned: always
  type: dict
"""


def _missing_packages(module: AnsibleModule, packages: list[str]) -> list[str]:
    dpkg = module.get_bin_path("dpkg-query")
    if not packages or dpkg is None:
        return list(packages)
    _, out, _ = module.run_command([dpkg, "-W", "-f=${Package} ${db:Status-Abbrev}\\n", *packages])
    fields = [line.split() for line in out.splitlines()]
    installed = {words[0] for words in fields if len(words) > 1 and words[1] == "ii"}
    return [name for name in packages if name not in installed]


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def _file(module: AnsibleModule, path: str) -> dict:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return {"state": "absent"}
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "link"}
    found = {
        "state": kinds.get(stat.S_IFMT(info.st_mode), "other"),
        "owner": _name(pwd.getpwuid, info.st_uid),
        "group": _name(grp.getgrgid, info.st_gid),
        "mode": f"{stat.S_IMODE(info.st_mode):04o}",
    }
    if found["state"] == "file":
        found["checksum"] = module.sha1(path)
    return found


def _service(module: AnsibleModule, unit: str) -> dict:
    systemctl = module.get_bin_path("systemctl")
    if systemctl is None:
        return {}
    props = "ActiveState,UnitFileState,NeedDaemonReload,LoadState"
    _, out, _ = module.run_command([systemctl, "show", f"--property={props}", unit])
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _os_release() -> dict:
    info = {"ID": "", "VERSION_ID": "", "VERSION_CODENAME": ""}
    try:
        with open("/etc/os-release", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key in info:
                    info[key] = value.strip('"')
    except OSError:
        pass
    return {
        "id": info["ID"],
        "version_id": info["VERSION_ID"],
        "codename": info["VERSION_CODENAME"],
    }


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
        missing_packages=_missing_packages(module, module.params["packages"]),
        files={path: _file(module, path) for path in module.params["files"]},
        service=_service(module, module.params["unit"]),
        os=_os_release(),
    )


if __name__ == "__main__":
    main()
