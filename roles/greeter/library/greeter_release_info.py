#!/usr/bin/python
"""Report a host's greeter deployment state in one module call.

A no-op rerun is dominated by round trips, not by work: asking ``stat``, ``find``,
``dpkg-query`` and ``systemctl`` separately costs one SSH exchange each per host. This
module answers all of those questions at once and changes nothing, so the role can skip
the expensive steps (apt, git, venv, pip, protoc) exactly when the host already has what
they would produce. It never decides anything itself: the role compares and acts. What it
shares with the balancer's state read (greeter_lb_info) is module_utils/greeter_host.py.
"""

from __future__ import annotations

import grp
import os
import pwd
import re

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.greeter_boot import cloud_init_state, dpkg_lock_holders
from ansible.module_utils.greeter_host import (
    file_state,
    missing_packages,
    os_release,
    owner_name,
    unit_state,
)

DOCUMENTATION = r"""
---
module: greeter_release_info
short_description: Report releases, packages and service state of a greeter host in one call
description:
  - Reads the tree under O(root): the code builds (C(builds/<commit>/) and their C(.complete)
    marker), the releases (C(releases/<commit>-<config digest>/), each a build paired with the
    configuration the service reads, with its C(.complete) marker and the state of its
    O(release_files)), the C(current) and C(previous) links; which of O(packages) are not
    installed, the systemd version, C(/etc/os-release) and the state of O(unit).
  - Read-only; safe in check mode.
options:
  root:
    description: Directory holding C(builds/), C(releases/), C(current) and C(previous).
    type: path
    default: /opt/greeter
  commit:
    description: The commit about to be deployed (see RV(build_complete)).
    type: str
  release_files:
    description: Paths relative to a release directory whose state is reported for every release.
    type: list
    elements: str
    default: []
  packages:
    description: Debian package names whose absence is reported in RV(missing_packages).
    type: list
    elements: str
    default: []
  unit:
    description: systemd unit whose state is reported in RV(service).
    type: str
    default: greeter.service
  files:
    description: Paths whose type, owner, group, mode and SHA-1 are reported in RV(files).
    type: list
    elements: path
    default: []
  user:
    description: Account whose passwd entry is reported in RV(account).
    type: str
  group:
    description: Group whose existence is reported in RV(account).
    type: str
  probe:
    description:
      - A command (argv) checking that the service serves, run only when C(current) already points
        to a release of O(commit) and the unit is active, so a host with nothing to change is
        verified in this same call. Its outcome is RV(probe).
    type: list
    elements: str
    default: []
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
  description: Release (C(<commit>-<config digest>)) that C(current) points to, or null.
  returned: always
  type: str
previous:
  description: Release that C(previous) points to, or null.
  returned: always
  type: str
releases:
  description:
    - Releases on the host, newest first - C(id), C(commit), C(path), C(complete), C(built) and
      C(files) (the state of each of O(release_files) in it).
  returned: always
  type: list
  elements: dict
builds:
  description: Code builds on the host, newest first - C(commit), C(path), C(complete), C(built).
  returned: always
  type: list
  elements: dict
build_complete:
  description: Whether the build of O(commit) exists and finished building.
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
  description: C(id), C(version_id) and C(codename) from /etc/os-release, and C(python), the
    host's Python 3 (major.minor) that runs this module: the distribution facts the role needs,
    without a full fact gathering.
  returned: always
  type: dict
boot:
  description:
    - Whether the host's first boot is still busy. C(cloud_init) is C(done) once cloud-init
      finished this boot, C(running) while it works, C(absent) when it did not run (not
      installed or disabled). C(dpkg_lock) names the processes holding dpkg's locks
      (C(lock-frontend), C(lock)), empty when they are free.
  returned: always
  type: dict
current_target:
  description: Where C(current) points, verbatim, or null.
  returned: always
  type: str
files:
  description: Actual C(state) (absent, file, directory, link, other), C(owner), C(group), C(mode)
    and C(checksum) of each path of O(files).
  returned: always
  type: dict
account:
  description: C(user) (passwd fields of O(user) or null) and C(group_exists).
  returned: always
  type: dict
probe:
  description: C(rc), C(stdout) and C(stderr) of O(probe), or null when it did not run.
  returned: always
  type: dict
free:
  description:
    - C(path) and C(mib) free on it (without the blocks reserved for root) for the directory a
      new build is made in, C(builds/) under O(root) or the nearest existing one above it.
  returned: always
  type: dict
"""

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# A release is a build paired with a configuration: <commit>-<first 12 hex of the config digest>.
RELEASE = re.compile(r"^[0-9a-f]{40}-[0-9a-f]{12}$")


def _link_release(path: str) -> str | None:
    """The release a link points to, by its directory name; None when absent or foreign."""
    if not os.path.islink(path):
        return None
    name = os.path.basename(os.readlink(path).rstrip("/"))
    return name if RELEASE.match(name) else None


def _folder(root: str, kind: str, pattern: re.Pattern) -> list[dict]:
    """Directories of builds/ or releases/, newest first, with their .complete marker."""
    folder = os.path.join(root, kind)
    found = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if not pattern.match(name) or not os.path.isdir(path):
                continue
            marker = os.path.join(path, ".complete")
            complete = os.path.isfile(marker)
            built = os.stat(marker if complete else path).st_mtime
            found.append({"commit": name[:40], "path": path, "complete": complete, "built": built})
    return sorted(found, key=lambda entry: entry["built"], reverse=True)


def _releases(module: AnsibleModule, root: str, names: list[str]) -> list[dict]:
    releases = _folder(root, "releases", RELEASE)
    for release in releases:
        release["id"] = os.path.basename(release["path"])
        release["files"] = {
            name: file_state(module, os.path.join(release["path"], name)) for name in names
        }
    return releases


def _systemd(module: AnsibleModule, unit: str) -> tuple[int, dict]:
    systemctl = module.get_bin_path("systemctl")
    if systemctl is None:
        return 0, {}
    _, version_out, _ = module.run_command([systemctl, "--version"])
    match = re.match(r"systemd (\d+)", version_out)
    props = "ActiveState,SubState,UnitFileState,MainPID,NeedDaemonReload,LoadState"
    return (int(match.group(1)) if match else 0), unit_state(module, unit, props)


def _account(user: str | None, group: str | None) -> dict:
    found: dict = {"user": None, "group_exists": False}
    if user:
        try:
            entry = pwd.getpwnam(user)
            found["user"] = {
                "uid": entry.pw_uid,
                "group": owner_name(grp.getgrgid, entry.pw_gid),
                "home": entry.pw_dir,
                "shell": entry.pw_shell,
            }
        except KeyError:
            pass
    if group:
        try:
            grp.getgrnam(group)
            found["group_exists"] = True
        except KeyError:
            pass
    return found


def _free(root: str) -> dict:
    """Space left where a release is built, so a full disk fails before the build starts.

    A virtualenv that runs out of space fails in ensurepip with no word about space; the
    role compares this with what a release needs and says so instead.
    """
    path = os.path.join(root, "builds")
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    info = os.statvfs(path)
    return {"path": path, "mib": info.f_bavail * info.f_frsize // (1024 * 1024)}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "default": "/opt/greeter"},
            "commit": {"type": "str"},
            "release_files": {"type": "list", "elements": "str", "default": []},
            "packages": {"type": "list", "elements": "str", "default": []},
            "unit": {"type": "str", "default": "greeter.service"},
            "files": {"type": "list", "elements": "path", "default": []},
            "user": {"type": "str"},
            "group": {"type": "str"},
            "probe": {"type": "list", "elements": "str", "default": []},
        },
        supports_check_mode=True,
    )
    root = module.params["root"]
    commit = module.params["commit"]
    builds = _folder(root, "builds", COMMIT)
    releases = _releases(module, root, module.params["release_files"])
    systemd_version, service = _systemd(module, module.params["unit"])
    current = os.path.join(root, "current")
    current_target = os.readlink(current) if os.path.islink(current) else None
    current_release = _link_release(current)
    probe = None
    if (
        module.params["probe"]
        and current_release is not None
        and commit is not None
        and current_release.startswith(commit + "-")
        and service.get("ActiveState") == "active"
    ):
        command = module.params["probe"]
        if os.access(command[0], os.X_OK):
            rc, out, err = module.run_command(command)
            probe = {"rc": rc, "stdout": out, "stderr": err}
        else:  # a release without its probe is not as the role makes it: not in sync
            probe = {"rc": 127, "stdout": "", "stderr": f"{command[0]}: not found"}
    module.exit_json(
        changed=False,
        current=current_release,
        current_target=current_target,
        previous=_link_release(os.path.join(root, "previous")),
        releases=releases,
        builds=builds,
        build_complete=any(b["commit"] == commit and b["complete"] for b in builds),
        missing_packages=missing_packages(module, module.params["packages"]),
        service=service,
        systemd_version=systemd_version,
        os=os_release(),
        boot={"cloud_init": cloud_init_state(), "dpkg_lock": dpkg_lock_holders()},
        files={path: file_state(module, path) for path in module.params["files"]},
        account=_account(module.params["user"], module.params["group"]),
        probe=probe,
        free=_free(root),
    )


if __name__ == "__main__":
    main()
