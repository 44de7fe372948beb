"""The services on the bridge (apt proxy, git daemon, wheels) and the AWS emulator on loopback."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from .common import (
    APT_PORT,
    DISTRO_PYTHONS,
    EMULATOR,
    GIT_PORT,
    LAB_ROOT,
    LAUNCHER,
    REPO,
    VENV_BIN,
    WHEEL_PORT,
    WHEEL_REQUIREMENTS,
    LabError,
    log,
    run,
)
from .image import image_mirror
from .state import Lab, alive, spawn

WHEEL_SERVER = Path(__file__).with_name("wheelserver.py")


def git_head() -> str:
    return run("git", "-C", REPO, "rev-parse", "HEAD", capture_output=True).stdout.strip()


def refresh_mirror(lab: Lab) -> str:
    """Push the working repository's committed HEAD (and tags) into the lab's bare mirror."""
    mirror = lab.state / "git" / "greeter.git"
    if not mirror.exists():
        run("git", "init", "--quiet", "--bare", "--initial-branch=main", mirror)
        (mirror / "git-daemon-export-ok").touch()
    refs = ["HEAD:refs/heads/main", "refs/tags/*:refs/tags/*"]
    run("git", "-C", REPO, "push", "--quiet", "--force", mirror, *refs)
    lab.commit = git_head()
    lab.save()
    return lab.commit


def ensure_wheelhouse(python: str) -> Path:
    """Wheels of the service's pinned requirements for the hosts' CPython `python` (x86_64),
    downloaded once per requirements file and Python."""
    key = hashlib.sha256(WHEEL_REQUIREMENTS.read_bytes()).hexdigest()[:16]
    house = LAB_ROOT / "cache" / "wheels" / f"{key}-cp{python.replace('.', '')}"
    if (house / ".complete").exists():
        return house
    pip = VENV_BIN / "pip"
    if not pip.exists():
        raise LabError(f"{pip} is missing: run `make venv` first")
    log(f"downloading the wheelhouse for service/requirements.txt, Python {python} (once)")
    house.mkdir(parents=True, exist_ok=True)
    fetched = run(
        pip, "download", "--quiet", "--disable-pip-version-check", "--dest", house,
        "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
        "--platform", "manylinux_2_28_x86_64",
        "-r", WHEEL_REQUIREMENTS, "pip", "wheel", check=False, capture_output=True,
    )  # fmt: skip
    if fetched.returncode != 0:
        # Debian 11's Python 3.9, say: the pinned grpcio and protobuf need 3.10. Serve what is
        # there and say why the rest is missing; the role refuses such a host by name anyway.
        reason = fetched.stderr.strip().splitlines()[-1:] or ["pip download failed"]
        (house / "UNAVAILABLE.txt").write_text(
            f"No wheels of service/requirements.txt for CPython {python}: {reason[0]}\n"
        )
        log(f"warning: no wheels of service/requirements.txt for Python {python}: {reason[0]}")
    (house / ".complete").touch()
    return house


# ForceManaged: only the Remap-* archives below are served (403 for anything else), and an
# empty PassThroughPattern allows no CONNECT tunnels.
# SPfilePatternEx: apt-cacher-ng 3.7.4 answers some of several clients that ask for the same
# volatile file at once "200, Content-Length: N" and closes without a body (measured: 1 to 5 of 12
# concurrent InRelease requests, cold or cached); apt 2.6 that gets two such answers in a row for
# one file never finishes (its http method and apt itself each wait for the other). Served as
# static files they are whole every time; a lab starts from fresh ones (RELEASE_FILES).
ACNG_CONF = """\
CacheDir: {cache}
LogDir: {conf}/log
SupportDir: /usr/lib/apt-cacher-ng
BindAddress: {bridge}
Port: {port}
SocketPath: {conf}/socket
Remap-debrep: file:deb_mirror*.gz /debian ; file:backends_debian
Remap-secdeb: security.debian.org security.debian.org/debian-security \
  deb.debian.org/debian-security /debian-security ; deb.debian.org/debian-security
ForceManaged: 1
PassThroughPattern: ^$
ExThreshold: 4
SPfilePatternEx: /dists/[^/]+/(InRelease|Release|Release\\.gpg)$
"""

# The cached release files a lab must not inherit: static in the lab's proxy, they would stay
# as old as the first lab of that name; each `up` fetches the archive's current ones.
RELEASE_FILES = ("*/dists/*/InRelease*", "*/dists/*/Release*")


def apt_proxy_config(lab: Lab) -> Path:
    """An apt-cacher-ng configuration that serves the Debian archive and nothing else."""
    conf = lab.state / "apt-cacher-ng"
    cache = LAB_ROOT / "cache" / f"apt-{lab.name}"
    for path in (conf / "log", cache):
        path.mkdir(parents=True, exist_ok=True)
    for pattern in RELEASE_FILES:
        for stale in cache.glob(pattern):
            stale.unlink()
    (conf / "backends_debian").write_text(image_mirror().rstrip("/") + "/\n")
    (conf / "acng.conf").write_text(
        ACNG_CONF.format(cache=cache, conf=conf, bridge=lab.bridge_address, port=APT_PORT)
    )
    return conf


# From spawning to answering: moto's import plus its own check over HTTP take seconds, longer on a
# machine busy building an image (the emulator's log says which step a slow start was in).
EMULATOR_READY_SECONDS = 180


def start_emulator(lab: Lab) -> None:
    """The emulator on a loopback port the kernel picks as it binds, saved as lab.emulator_port.

    A port chosen before the server binds it can be taken meanwhile (an outgoing loopback
    connection may get it as its ephemeral port), and the emulator would exit; port 0 cannot
    collide. The emulator writes its endpoint to a ready file once it answers over HTTP."""
    ready = lab.state / "emulator.url"
    ready.unlink(missing_ok=True)
    logfile = lab.state / "logs" / "emulator.log"
    command = [str(VENV_BIN / "python"), str(EMULATOR), "--port", "0", "--ready-file", str(ready)]
    spawn(lab, "emulator", command, logfile)
    deadline = time.monotonic() + EMULATOR_READY_SECONDS
    while not ready.exists():
        if not alive(lab.processes["emulator"]):
            tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
            raise LabError(f"the AWS emulator exited before it answered; {logfile} ends:\n{tail}")
        if time.monotonic() > deadline:
            raise LabError(
                f"the AWS emulator did not answer within {EMULATOR_READY_SECONDS}s; see {logfile}"
            )
        time.sleep(0.1)
    port = urlsplit(ready.read_text().strip()).port
    if port is None:
        raise LabError(f"the AWS emulator wrote no port to {ready}")
    lab.emulator_port = port
    lab.save()


def git_daemon_command(address: str, port: int, root: str) -> list[str]:
    """--max-connections=0: git daemon's default of 32 clients at once drops the rest ("Too
    many children, dropping connection") once Ansible's forks clone on more hosts than that."""
    return [
        "git", "daemon", "--reuseaddr", "--verbose", "--max-connections=0",
        f"--listen={address}", f"--port={port}", f"--base-path={root}", root,
    ]  # fmt: skip


def start_services(lab: Lab) -> None:
    """The emulator on loopback (first: the launcher reads its port); the apt proxy, git daemon
    and wheel server on the bridge only."""
    if not alive(lab.processes.get("emulator")):
        start_emulator(lab)
    b = lab.bridge_address
    git_root = str(lab.state / "git")
    commands = {
        "launcher": lambda: [str(VENV_BIN / "python"), str(LAUNCHER), lab.name],
        "apt": lambda: ["apt-cacher-ng", "-c", str(apt_proxy_config(lab)), "ForeGround=1"],
        "git": lambda: git_daemon_command(b, GIT_PORT, git_root),
        "wheels": lambda: [
            sys.executable, str(WHEEL_SERVER), b, str(WHEEL_PORT),
            str(ensure_wheelhouse(DISTRO_PYTHONS[lab.distro])),
        ],
    }  # fmt: skip
    for role, command in commands.items():
        if not alive(lab.processes.get(role)):
            spawn(lab, role, command(), lab.state / "logs" / f"{role}.log")
