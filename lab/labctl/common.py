"""Settings, errors and small helpers shared by every part of the lab."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # `python3 lab/labctl ...` runs the command line
REPO = PACKAGE.parent.parent


LAB_ROOT = REPO / ".lab"


VENV_BIN = REPO / ".venv" / "bin"


BUILD_IMAGE = REPO / "lab" / "build-image"


HOST_DEPS = REPO / "lab" / "host-deps"


EMULATOR = REPO / "lab" / "emulator.py"


LAUNCHER = REPO / "lab" / "launcher.py"


WHEEL_REQUIREMENTS = REPO / "service" / "requirements.txt"


APT_PORT = 13142  # not the packages' defaults (3142, 8000): a machine may run those already


GIT_PORT = 9418


WHEEL_PORT = 18000


REGION = "us-east-1"  # LAB_REGION's default: the region the lab's emulated AWS is used in


# LAB_DISTRO -> the CPython its hosts run (the wheelhouse serves wheels for exactly that one).
DISTRO_PYTHONS = {"bookworm": "3.11", "trixie": "3.13", "bullseye": "3.9"}


DEFAULT_DISTRO = "bookworm"


# LAB_BUSY_BOOT's default: about as long as apt-daily and unattended-upgrades keep dpkg locked
# after an Ubuntu instance's first boot, at the short end.
DEFAULT_BUSY_BOOT = 60.0


STACK = "greeter"


SSH_USER = "ubuntu"


NSPAWN_RUN = Path("/run/systemd/nspawn")


CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


STOP_TIMEOUT = 8.0


HOST_STOP_TIMEOUT = 3.0  # a clean power-off first; these hosts are thrown away anyway


class LabError(Exception):
    """A problem the user can fix; printed without a traceback."""


def log(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def run(*args: str | Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, text=True, **kwargs)


def ip(command: str, check: bool = True) -> bool:
    """One `ip` command; lab names and addresses are validated, so splitting on spaces is safe."""
    return run("ip", *command.split(), check=check, capture_output=not check).returncode == 0


def quiet(*args: str | Path) -> bool:
    """Run a clean-up command whose failure only means there was nothing to clean."""
    return run(*args, check=False, capture_output=True).returncode == 0


def lab_name() -> str:
    name = os.environ.get("LAB_NAME") or "demo"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name):
        raise LabError(f"LAB_NAME={name!r}: use lower-case letters, digits and dashes (<= 32)")
    return name


def lab_distro() -> str:
    distro = os.environ.get("LAB_DISTRO") or DEFAULT_DISTRO
    if distro not in DISTRO_PYTHONS:
        raise LabError(f"LAB_DISTRO={distro!r}: one of {', '.join(DISTRO_PYTHONS)}")
    return distro


def lab_region() -> str:
    region = os.environ.get("LAB_REGION") or REGION
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-[0-9]", region):
        raise LabError(f"LAB_REGION={region!r}: an AWS region such as eu-west-1")
    return region


def lab_busy_boot() -> float:
    value = os.environ.get("LAB_BUSY_BOOT") or str(DEFAULT_BUSY_BOOT)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise LabError(f"LAB_BUSY_BOOT={value!r}: seconds within 0-3600 (0: an idle first boot)")
    return seconds


def short_id(name: str) -> str:
    """A name fragment short enough for Linux interface names (15 characters at most)."""
    if len(name) <= 8:
        return name
    return format(zlib.crc32(name.encode()), "08x")[:8]
