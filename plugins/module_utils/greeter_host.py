"""What both roles' state reads ask of a host: missing packages, files, a unit, the OS.

greeter_release_info (the greeter role) and greeter_lb_info (greeter_lb) each answer a rerun's
questions in one module call; the answers they share come from here, so a file or a unit reads
the same on a backend and on the balancer. Found through ansible.cfg's ``module_utils``.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import sys


def missing_packages(module, packages: list[str]) -> list[str]:
    """Which of ``packages`` dpkg does not have installed (all of them without dpkg-query)."""
    if not packages:
        return []
    dpkg = module.get_bin_path("dpkg-query")
    if dpkg is None:
        return list(packages)
    _, out, _ = module.run_command([dpkg, "-W", "-f=${Package} ${db:Status-Abbrev}\\n", *packages])
    fields = [line.split() for line in out.splitlines()]
    installed = {words[0] for words in fields if len(words) > 1 and words[1] == "ii"}
    return [name for name in packages if name not in installed]


def owner_name(lookup, number: int) -> str:
    """A user or group name (``pwd.getpwuid``/``grp.getgrgid``), or the number when unnamed."""
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


def file_state(module, path: str) -> dict:
    """What the file, copy and template modules compare: type, ownership, mode, content."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return {"state": "absent"}
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "link"}
    found = {
        "state": kinds.get(stat.S_IFMT(info.st_mode), "other"),
        "owner": owner_name(pwd.getpwuid, info.st_uid),
        "group": owner_name(grp.getgrgid, info.st_gid),
        "mode": f"{stat.S_IMODE(info.st_mode):04o}",
    }
    if found["state"] == "file":
        found["checksum"] = module.sha1(path)
    return found


def unit_state(module, unit: str, props: str) -> dict:
    """``systemctl show --property=props unit`` as a dict ({} without systemctl)."""
    systemctl = module.get_bin_path("systemctl")
    if systemctl is None:
        return {}
    _, out, _ = module.run_command([systemctl, "show", f"--property={props}", unit])
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def os_release() -> dict:
    """``id``, ``version_id`` and ``codename`` of /etc/os-release, and the module's Python."""
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
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
    }
