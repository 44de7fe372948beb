#!/usr/bin/python
"""Report a host's greeter deployment state in one module call.

A no-op rerun is dominated by round trips, not by work: asking ``stat``, ``find``,
``dpkg-query`` and ``systemctl`` separately costs one SSH exchange each per host. This
module answers all of those questions at once and changes nothing, so the role can skip
the expensive steps (apt, git, venv, pip, protoc) exactly when the host already has what
they would produce. It never decides anything itself: the role compares and acts.
"""

from __future__ import annotations

import os
import re

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: greeter_release_info
short_description: Report releases, packages and service state of a greeter host in one call
description:
  - Reads the release tree under O(root) (C(releases/<commit>/), C(current) and C(previous) links,
    the C(.complete) marker of each release), which of O(packages) are not installed,
    the systemd version, C(/etc/os-release) and the state of O(unit).
  - Read-only; safe in check mode.
options:
  root:
    description: Directory holding C(releases/), C(current) and C(previous).
    type: path
    default: /opt/greeter
  commit:
    description: The commit about to be deployed (see RV(wanted_complete)).
    type: str
  packages:
    description: Debian package names whose absence is reported in RV(missing_packages).
    type: list
    elements: str
    default: []
  unit:
    description: systemd unit whose state is reported in RV(service).
    type: str
    default: greeter.service
author: greeter project
"""

EXAMPLES = r"""
- name: Read the deployment state
  greeter_release_info:
    root: /opt/greeter
    commit: "{{ wanted_commit }}"
    packages: [python3-venv, git]
  register: state
"""

RETURN = r"""
current:
  description: Commit that C(current) points to, or null.
  returned: always
  type: str
previous:
  description: Commit that C(previous) points to, or null.
  returned: always
  type: str
releases:
  description: Releases on the host, newest build first.
  returned: always
  type: list
  elements: dict
wanted_complete:
  description: Whether the release of O(commit) exists and finished building.
  returned: always
  type: bool
missing_packages:
  description: Members of O(packages) that are not installed.
  returned: always
  type: list
  elements: str
service:
  description: C(ActiveState), C(UnitFileState), C(MainPID) and C(NeedDaemonReload) of O(unit).
  returned: always
  type: dict
systemd_version:
  description: Major version of systemd (0 when unknown).
  returned: always
  type: int
os:
  description: C(ID) and C(VERSION_ID) from /etc/os-release.
  returned: always
  type: dict
"""

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _link_commit(path: str) -> str | None:
    """The release a link points to, by its directory name; None when absent or foreign."""
    if not os.path.islink(path):
        return None
    name = os.path.basename(os.readlink(path).rstrip("/"))
    return name if COMMIT.match(name) else None


def _releases(root: str) -> list[dict]:
    folder = os.path.join(root, "releases")
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if not COMMIT.match(name) or not os.path.isdir(path):
                continue
            marker = os.path.join(path, ".complete")
            complete = os.path.isfile(marker)
            built = os.stat(marker if complete else path).st_mtime
            found.append({"commit": name, "path": path, "complete": complete, "built": built})
    return sorted(found, key=lambda release: release["built"], reverse=True)


def _missing_packages(module: AnsibleModule, packages: list[str]) -> list[str]:
    if not packages:
        return []
    dpkg = module.get_bin_path("dpkg-query")
    if dpkg is None:
        return list(packages)
    _, out, _ = module.run_command([dpkg, "-W", "-f=${Package} ${db:Status-Abbrev}\\n", *packages])
    fields = [line.split() for line in out.splitlines()]
    installed = {words[0] for words in fields if len(words) > 1 and words[1] == "ii"}
    return [name for name in packages if name not in installed]


def _systemd(module: AnsibleModule, unit: str) -> tuple[int, dict]:
    systemctl = module.get_bin_path("systemctl")
    if systemctl is None:
        return 0, {}
    _, version_out, _ = module.run_command([systemctl, "--version"])
    match = re.match(r"systemd (\d+)", version_out)
    props = "ActiveState,SubState,UnitFileState,MainPID,NeedDaemonReload,LoadState"
    _, out, _ = module.run_command([systemctl, "show", f"--property={props}", unit])
    service = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return (int(match.group(1)) if match else 0), service


def _os_release() -> dict:
    info = {"ID": "", "VERSION_ID": ""}
    try:
        with open("/etc/os-release", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key in info:
                    info[key] = value.strip('"')
    except OSError:
        pass
    return {"id": info["ID"], "version_id": info["VERSION_ID"]}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "default": "/opt/greeter"},
            "commit": {"type": "str"},
            "packages": {"type": "list", "elements": "str", "default": []},
            "unit": {"type": "str", "default": "greeter.service"},
        },
        supports_check_mode=True,
    )
    root = module.params["root"]
    commit = module.params["commit"]
    releases = _releases(root)
    systemd_version, service = _systemd(module, module.params["unit"])
    module.exit_json(
        changed=False,
        current=_link_commit(os.path.join(root, "current")),
        previous=_link_commit(os.path.join(root, "previous")),
        releases=releases,
        wanted_complete=any(r["commit"] == commit and r["complete"] for r in releases),
        missing_packages=_missing_packages(module, module.params["packages"]),
        service=service,
        systemd_version=systemd_version,
        os=_os_release(),
    )


if __name__ == "__main__":
    main()
