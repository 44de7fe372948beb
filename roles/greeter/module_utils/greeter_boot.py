"""What a host's first boot is still doing: cloud-init's progress and dpkg's lock holders.

Shared by greeter_release_info (which reports it) and greeter_boot_wait (which waits it out).
"""

from __future__ import annotations

import fcntl
import os
import struct

DPKG_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock")


def dpkg_lock_holders() -> list[str]:
    """Who holds dpkg's locks. apt and dpkg take POSIX (fcntl) locks, so ask the kernel the way
    apt would see them: F_GETLK reports the first conflicting lock and its holder's pid
    (a flock(2) lock is invisible to it, as it is to apt)."""
    holders = []
    for path in DPKG_LOCKS:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            lock_type, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
        finally:
            os.close(fd)
        if lock_type == fcntl.F_UNLCK:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().replace(b"\0", b" ").decode(errors="replace")
            command = " ".join(argv.split())
        except OSError:
            command = "?"
        holder = f"pid {pid} ({command[:80]})"
        if holder not in holders:
            holders.append(holder)
    return holders


def cloud_init_state() -> str:
    """cloud-init's progress in this boot, from its run folder (a tmpfs, so per boot): what
    `cloud-init status` reads, without its second of start-up."""
    if os.path.exists("/run/cloud-init/result.json"):
        return "done"
    if os.path.isdir("/run/cloud-init") and not os.path.exists("/run/cloud-init/disabled"):
        return "running"
    return "absent"
