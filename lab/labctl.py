#!/usr/bin/env python3
"""The local lab: disposable systemd hosts standing in for EC2, behind the emulated AWS API.

Each lab (selected by LAB_NAME, default ``demo``) has its own bridge, subnet, loopback port for the
AWS emulator and state folder ``.lab/<name>/``; ``down`` removes everything ``up`` made. Hosts are
systemd-nspawn containers booted from one cached Debian 12 image through an overlayfs each, in their
own network namespace on the bridge. Only the Python standard library is used, so ``lab down`` works
even without the project's virtualenv.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB_ROOT = REPO / ".lab"
VENV_BIN = REPO / ".venv" / "bin"
BUILD_IMAGE = REPO / "lab" / "build-image"
HOST_DEPS = REPO / "lab" / "host-deps"
EMULATOR = REPO / "lab" / "emulator.py"
WHEEL_REQUIREMENTS = REPO / "service" / "requirements.txt"

APT_PORT = 13142  # not the packages' defaults (3142, 8000): a machine may run those already
GIT_PORT = 9418
WHEEL_PORT = 18000
REGION = "us-east-1"
STACK = "greeter"
SSH_USER = "ubuntu"
NSPAWN_RUN = Path("/run/systemd/nspawn")
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
STOP_TIMEOUT = 8.0
HOST_STOP_TIMEOUT = 3.0  # a clean power-off first; these hosts are thrown away anyway


class LabError(Exception):
    """A problem the user can fix; printed without a traceback."""


@dataclass
class Host:
    """One lab host: a container booted in its own network namespace."""

    index: int
    name: str  # the instance's Name tag, also its hostname and inventory name
    address: str
    netns: str
    veth: str
    machine: str


@dataclass
class Lab:
    """Everything `up` made, saved in the state folder so that `down` can undo exactly that."""

    name: str
    subnet: str
    bridge: str
    bridge_address: str
    emulator_port: int
    image: str = ""
    commit: str = ""
    stack: str = STACK  # GREETER_STACK_NAME at `up`: the stack the lab's hosts stand in for
    hosts: list[Host] = field(default_factory=list)
    processes: dict[str, list[int]] = field(default_factory=dict)  # role -> [pid, start time]

    @property
    def state(self) -> Path:
        return LAB_ROOT / self.name

    def save(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        tmp = self.state / "lab.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(self.state / "lab.json")

    @classmethod
    def load(cls, name: str) -> Lab | None:
        path = LAB_ROOT / name / "lab.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["hosts"] = [Host(**h) for h in data["hosts"]]
        return cls(**data)


# --- small helpers -------------------------------------------------------------------------------


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


def short_id(name: str) -> str:
    """A name fragment short enough for Linux interface names (15 characters at most)."""
    if len(name) <= 8:
        return name
    return format(zlib.crc32(name.encode()), "08x")[:8]


def start_time(pid: int) -> int | None:
    """The process start time from /proc: a PID plus this identifies one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(record: list[int] | None) -> bool:
    return bool(record) and start_time(record[0]) == record[1]


def spawn(lab: Lab, role: str, args: list[str], logfile: Path, **kwargs) -> None:
    """Start a long-running lab process detached from this command, remembered by PID."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )
    lab.processes[role] = [proc.pid, start_time(proc.pid) or 0]
    lab.save()


def terminate(records: list[list[int]]) -> None:
    """SIGTERM the lab's own processes, only if PID and start time still match."""
    for record in records:
        if alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record[0], signal.SIGTERM)


def stop(records: list[list[int]], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the lab's own processes, give them `timeout` seconds, then SIGKILL."""
    live = [r for r in records if alive(r)]
    terminate(live)
    deadline = time.monotonic() + timeout
    while any(alive(r) for r in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, started in live:
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_port(address: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise LabError(f"{what} did not listen on {address}:{port} within {timeout:.0f}s")
        time.sleep(0.1)


# --- addresses and safety ------------------------------------------------------------------------


def routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine already routes or has an address in (default route aside)."""
    nets = []
    for route in json.loads(
        run("ip", "-j", "-4", "route", "show", "table", "all", capture_output=True).stdout
    ):
        dst = route.get("dst", "default")
        if dst != "default" and route.get("type", "unicast") in ("unicast", "local"):
            nets.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(run("ip", "-j", "-4", "addr", capture_output=True).stdout):
        for addr in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return nets


def choose_subnet(name: str) -> ipaddress.IPv4Network:
    """LAB_SUBNET, or a /24 derived from the lab name, that nothing on the machine uses yet."""
    taken = routed_networks()
    wanted = os.environ.get("LAB_SUBNET")
    if wanted:
        candidates = [ipaddress.ip_network(wanted)]
    else:
        first = zlib.crc32(name.encode()) % 250
        candidates = [
            ipaddress.ip_network(f"10.213.{(first + i) % 250 + 1}.0/24") for i in range(250)
        ]
    for net in candidates:
        if net.version == 4 and net.num_addresses >= 32 and not any(net.overlaps(t) for t in taken):
            return net
    raise LabError(f"no free lab subnet: {wanted or '10.213.x.0/24'} overlaps a network in use")


def choose_port(name: str) -> int:
    """A loopback TCP port for the emulator, derived from the lab name, that is free now."""
    first = zlib.crc32(name.encode()) % 1000
    for i in range(1000):
        port = 45000 + (first + i) % 1000
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise LabError("no free loopback port in 45000-45999 for the emulator")


def check_route(address: str, bridge: str) -> None:
    """Refuse to talk to an address unless the machine routes it through the lab's own bridge."""
    out = run("ip", "-j", "route", "get", address, capture_output=True).stdout
    route = json.loads(out)[0]
    if route.get("dev") != bridge or route.get("gateway"):
        raise LabError(
            f"refusing {address}: it routes via {route.get('dev')}, not the lab bridge {bridge}"
        )


# --- the image -----------------------------------------------------------------------------------


def image_mirror() -> str:
    """The Debian mirror apt on this machine already uses (debootstrap then needs no new source)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                if line.startswith("deb ") and "bookworm" in words:
                    return next(w for w in words[1:] if "://" in w)
                if line.startswith("URIs:") and "/debian" in line and "security" not in line:
                    return words[1]
    return "http://deb.debian.org/debian"


def ensure_image() -> Path:
    """The cached base image for the current recipe, built under a lock if missing."""
    recipe = hashlib.sha256(BUILD_IMAGE.read_bytes()).hexdigest()[:16]
    images = LAB_ROOT / "image"
    images.mkdir(parents=True, exist_ok=True)
    image = images / recipe
    with (images / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (image / "rootfs" / "etc" / "os-release").exists():
            return image / "rootfs"
        log(f"building the base image {recipe} (about 90 s, once per recipe)")
        started = time.monotonic()
        tmp = images / f"{recipe}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        run(BUILD_IMAGE, tmp / "rootfs", image_mirror(), stdout=subprocess.DEVNULL)
        if image.exists():
            shutil.rmtree(image)
        tmp.rename(image)
        log(f"image built in {time.monotonic() - started:.0f}s")
        prune_images(keep=image)
        return image / "rootfs"


def prune_images(keep: Path) -> None:
    """Remove images of older recipes that no lab on this machine still runs on."""
    in_use = {keep}
    for saved in LAB_ROOT.glob("*/lab.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            in_use.add(Path(json.loads(saved.read_text())["image"]).parent)
    for old in keep.parent.iterdir():
        if old.is_dir() and old not in in_use and not old.name.endswith(".tmp"):
            log(f"removing the unused image {old.name}")
            shutil.rmtree(old)


# --- services on the bridge ----------------------------------------------------------------------


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


def ensure_wheelhouse() -> Path:
    """Wheels for the service's pinned requirements, downloaded once per requirements file."""
    key = hashlib.sha256(WHEEL_REQUIREMENTS.read_bytes()).hexdigest()[:16]
    house = LAB_ROOT / "cache" / "wheels" / key
    if (house / ".complete").exists():
        return house
    pip = VENV_BIN / "pip"
    if not pip.exists():
        raise LabError(f"{pip} is missing: run `make venv` first")
    log("downloading the wheelhouse for service/requirements.txt (once)")
    house.mkdir(parents=True, exist_ok=True)
    # The hosts run Debian 12's CPython 3.11 on x86_64; ask for exactly their wheels.
    run(
        pip, "download", "--quiet", "--disable-pip-version-check", "--dest", house,
        "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
        "--platform", "manylinux_2_28_x86_64",
        "-r", WHEEL_REQUIREMENTS, "pip", "wheel",
    )  # fmt: skip
    (house / ".complete").touch()
    return house


# ForceManaged: only the Remap-* archives below are served (403 for anything else), and an
# empty PassThroughPattern allows no CONNECT tunnels.
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
"""


def apt_proxy_config(lab: Lab) -> Path:
    """An apt-cacher-ng configuration that serves the Debian archive and nothing else."""
    conf = lab.state / "apt-cacher-ng"
    cache = LAB_ROOT / "cache" / f"apt-{lab.name}"
    for path in (conf / "log", cache):
        path.mkdir(parents=True, exist_ok=True)
    (conf / "backends_debian").write_text(image_mirror().rstrip("/") + "/\n")
    (conf / "acng.conf").write_text(
        ACNG_CONF.format(cache=cache, conf=conf, bridge=lab.bridge_address, port=APT_PORT)
    )
    return conf


def start_services(lab: Lab) -> None:
    """The emulator on loopback; the apt proxy, git daemon and wheel server on the bridge only."""
    b = lab.bridge_address
    git_root = str(lab.state / "git")
    commands = {
        "emulator": lambda: [
            str(VENV_BIN / "python"), str(EMULATOR), "--port", str(lab.emulator_port),
        ],
        "apt": lambda: ["apt-cacher-ng", "-c", str(apt_proxy_config(lab)), "ForeGround=1"],
        "git": lambda: [
            "git", "daemon", "--reuseaddr", "--verbose", f"--listen={b}", f"--port={GIT_PORT}",
            f"--base-path={git_root}", git_root,
        ],
        "wheels": lambda: [
            sys.executable, "-m", "http.server", "--bind", b,
            "--directory", str(ensure_wheelhouse()), str(WHEEL_PORT),
        ],
    }  # fmt: skip
    for role, command in commands.items():
        if not alive(lab.processes.get(role)):
            spawn(lab, role, command(), lab.state / "logs" / f"{role}.log")


# --- hosts ---------------------------------------------------------------------------------------


def host_dir(lab: Lab, host: Host) -> Path:
    return lab.state / "hosts" / host.name


def mount_host_tmpfs(lab: Lab) -> None:
    """Keep what the hosts write (their overlay upper dirs) in memory: a disposable host's
    writes never need to reach the disk, and `down` then has nothing to flush or delete."""
    hosts = lab.state / "hosts"
    hosts.mkdir(exist_ok=True)
    size = os.environ.get("LAB_HOSTS_TMPFS_SIZE", "16g")
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", f"lab-{lab.name}", hosts)


def cgroup_name(lab: Lab, host: Host) -> str:
    return f"greeter-lab/{host.machine}"


def make_network(lab: Lab) -> None:
    prefix = ipaddress.ip_network(lab.subnet).prefixlen
    ip(f"link add {lab.bridge} type bridge")
    ip(f"addr add {lab.bridge_address}/{prefix} dev {lab.bridge}")
    ip(f"link set {lab.bridge} up")


def make_host_network(lab: Lab, host: Host) -> None:
    """A network namespace whose only way out is a veth to the lab bridge: no default route."""
    prefix = ipaddress.ip_network(lab.subnet).prefixlen
    ip(f"netns add {host.netns}")
    ip(f"link add {host.veth} type veth peer name eth0 netns {host.netns}")
    ip(f"link set {host.veth} master {lab.bridge} up")
    ip(f"-n {host.netns} addr add {host.address}/{prefix} dev eth0")
    ip(f"-n {host.netns} link set eth0 up")
    ip(f"-n {host.netns} link set lo up")


HOST_APT_PROXY = """\
// Written by lab/lab: the lab's apt-cacher-ng on the bridge (the Debian archive only).
Acquire::http::Proxy "http://{bridge}:{apt_port}";
// A half-closed connection to the proxy must fail and be retried, not hang a deploy for minutes.
Acquire::http::Timeout "30";
Acquire::Retries "3";
"""

HOST_PIP_CONF = """\
# Written by lab/lab: the lab's wheelhouse on the bridge. Real hosts use PyPI, or a wheelhouse
# of their own in private subnets.
[global]
no-index = true
find-links = http://{bridge}:{wheel_port}/
trusted-host = {bridge}
disable-pip-version-check = true
"""

HOST_HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\t{name}
::1\tlocalhost ip6-localhost ip6-loopback
"""


def keygen(path: Path, comment: str) -> None:
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path)


def prepare_root(lab: Lab, host: Host, image: Path) -> None:
    """Mount the host's overlay and give it its own identity, SSH keys and package sources."""
    d = host_dir(lab, host)
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    run(
        "mount", "-t", "overlay", "overlay",
        "-o", f"lowerdir={image},upperdir={d / 'upper'},workdir={d / 'work'}", d / "root",
    )  # fmt: skip
    root = d / "root"
    (root / "etc/hostname").write_text(f"{host.name}\n")
    (root / "etc/hosts").write_text(HOST_HOSTS.format(name=host.name))
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    key = root / "etc/ssh/ssh_host_ed25519_key"
    keygen(key, f"root@{host.name}")
    ssh = root / "home/ubuntu/.ssh"
    shutil.copy(lab.state / "ssh" / "id_ed25519.pub", ssh / "authorized_keys")
    os.chown(ssh / "authorized_keys", 1000, 1000)
    os.chmod(ssh / "authorized_keys", 0o600)
    sources = {"bridge": lab.bridge_address, "apt_port": APT_PORT, "wheel_port": WHEEL_PORT}
    (root / "etc/apt/apt.conf.d/80lab-proxy").write_text(HOST_APT_PROXY.format(**sources))
    (root / "etc/pip.conf").write_text(HOST_PIP_CONF.format(**sources))
    public = Path(f"{key}.pub").read_text().split()[:2]
    with (lab.state / "ssh" / "known_hosts").open("a") as out:
        out.write(f"{host.address} {' '.join(public)}\n")


def join_cgroups(name: str) -> None:
    """Move this process into its own cgroup, so each nspawn gets its own payload/supervisor."""
    for base in CGROUP_ROOTS:
        if base.is_dir():
            path = base / name
            path.mkdir(parents=True, exist_ok=True)
            (path / "cgroup.procs").write_text(f"{os.getpid()}\n")


def cgroup_dirs(top: Path) -> list[Path]:
    """Every folder under a cgroup, deepest first. os.walk, not rglob: a host's systemd removes
    its own cgroups while we look, and rglob raises on a folder that vanished mid-walk."""
    return [Path(folder) for folder, _, _ in os.walk(top, topdown=False)]


def cgroup_pids(name: str) -> list[int]:
    pids = []
    for base in CGROUP_ROOTS:
        for folder in cgroup_dirs(base / name):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (folder / "cgroup.procs").read_text().split()]
    return pids


def remove_cgroups(name: str) -> None:
    for base in CGROUP_ROOTS:
        top = base / name
        if top.is_dir():
            for path in cgroup_dirs(top):  # top itself comes last
                with contextlib.suppress(OSError):
                    path.rmdir()
            with contextlib.suppress(OSError):
                top.parent.rmdir()  # greeter-lab itself, once no other lab uses it


def nspawn_command(lab: Lab, host: Host) -> list[str]:
    return [
        "systemd-nspawn", "--boot", "--quiet",
        f"--directory={host_dir(lab, host) / 'root'}", f"--machine={host.machine}",
        "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{host.netns}",
        "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=passive",
    ]  # fmt: skip


def run_host(name: str, index: int) -> int:
    """Keep one host running: boot it and boot it again whenever the guest reboots (exit 133)."""
    lab = Lab.load(name)
    if lab is None:
        raise LabError(f"lab {name} has no state")
    host = lab.hosts[index]
    join_cgroups(cgroup_name(lab, host))
    env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network")
    stopping = False
    child: subprocess.Popen | None = None

    def on_term(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # nspawn asks the guest's systemd to power off

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while True:
        child = subprocess.Popen(nspawn_command(lab, host), env=env, stdin=subprocess.DEVNULL)
        code = child.wait()
        if stopping or code != 133:
            log(f"{host.name}: nspawn exited with {code}")
            return code
        log(f"{host.name}: the guest rebooted; booting it again")


def wait_ssh(lab: Lab, timeout: float | None = None) -> None:
    # Hosts boot in parallel but share two cores: allow more time for bigger labs.
    timeout = timeout if timeout is not None else 60.0 + 10.0 * len(lab.hosts)
    deadline = time.monotonic() + timeout
    pending = {h.name: h for h in lab.hosts}
    while pending:
        for host in list(pending.values()):
            check_route(host.address, lab.bridge)
            argv = [*ssh_command(lab, host), "-o", "ConnectTimeout=1", "true"]
            probe = run(*argv, check=False, capture_output=True)
            if probe.returncode == 0:
                del pending[host.name]
        if pending and time.monotonic() > deadline:
            raise LabError(f"no SSH answer within {timeout:.0f}s from {', '.join(pending)}")
        if pending:
            time.sleep(0.2)


def ssh_options(lab: Lab) -> list[str]:
    return [
        "-i", str(lab.state / "ssh" / "id_ed25519"),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={lab.state / 'ssh' / 'known_hosts'}",
        "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
    ]  # fmt: skip


def ssh_command(lab: Lab, host: Host) -> list[str]:
    return ["ssh", *ssh_options(lab), f"{SSH_USER}@{host.address}"]


# --- inventory and environment -------------------------------------------------------------------


INVENTORY_HOSTS = """\
---
# Written by lab/lab up. The hosts come from inventory/aws_ec2.yml; this file only makes
# this folder an inventory source, so that its group_vars/ and host_vars/ apply.
all: {}
"""

INVENTORY_ALL = """\
---
# Written by lab/lab up: the lab's stack parameters and where the hosts get the code.
greeter_stack_name: {stack}
greeter_stack_region: {region}
greeter_stack_instance_count: {count}
greeter_stack_key_name: lab-{name}
greeter_stack_admin_cidr: {subnet}
greeter_stack_client_cidr: {subnet}
greeter_repo_url: git://{bridge}/greeter.git
greeter_version: {commit}
"""

INVENTORY_HOST = """\
---
# Written by lab/lab up: instance {name} is backed by a lab host.
ansible_host: {address}
"""


def write_inventory(lab: Lab) -> None:
    """The second inventory source: lab addresses for the stack's instances, the lab's settings."""
    inv = lab.state / "inventory"
    (inv / "host_vars").mkdir(parents=True, exist_ok=True)
    (inv / "group_vars").mkdir(parents=True, exist_ok=True)
    (inv / "hosts.yml").write_text(INVENTORY_HOSTS)
    (inv / "group_vars" / "all.yml").write_text(
        INVENTORY_ALL.format(
            stack=lab.stack,
            region=REGION,
            count=len(lab.hosts),
            name=lab.name,
            subnet=lab.subnet,
            bridge=lab.bridge_address,
            commit=lab.commit,
        )
    )
    for host in lab.hosts:
        check_route(host.address, lab.bridge)
        (inv / "host_vars" / f"{host.name}.yml").write_text(
            INVENTORY_HOST.format(name=host.name, address=host.address)
        )


def ansible_ssh_args(lab: Lab) -> str:
    """ANSIBLE_SSH_ARGS: the lab's SSH options, then ansible.cfg's ssh_args.

    OpenSSH keeps the FIRST value of an option, and Ansible puts ssh_args before
    ssh_common_args: in ANSIBLE_SSH_COMMON_ARGS, the lab's StrictHostKeyChecking=yes would lose
    to ansible.cfg's accept-new. Set here (replacing ansible.cfg's ssh_args, so they are repeated
    after the lab's), the lab's options come first and apply.
    """
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO / "ansible.cfg")
    project = config.get("ssh_connection", "ssh_args", fallback="")
    return " ".join([shlex.join(ssh_options(lab)[2:]), project]).strip()


def venv_path() -> str:
    """PATH with the project's virtualenv first (once, however often `lab env` is evaluated)."""
    rest = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":") if p != str(VENV_BIN)]
    return ":".join([str(VENV_BIN), *rest])


def environment(lab: Lab) -> dict[str, str]:
    """What turns a shell into the lab's: AWS API on loopback, lab inventory, lab SSH key."""
    ansible_home = lab.state / "ansible"
    return {
        "LAB_NAME": lab.name,
        # Tests push other commits or branches here; hosts clone it as git://<bridge>/greeter.git.
        "LAB_GIT_MIRROR": str(lab.state / "git" / "greeter.git"),
        "LAB_APT_PROXY": f"http://{lab.bridge_address}:{APT_PORT}",
        "LAB_WHEELHOUSE_URL": f"http://{lab.bridge_address}:{WHEEL_PORT}/",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{lab.emulator_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "GREETER_STACK_NAME": lab.stack,
        "ANSIBLE_INVENTORY": f"{REPO / 'inventory'},{lab.state / 'inventory'}",
        "ANSIBLE_PRIVATE_KEY_FILE": str(lab.state / "ssh" / "id_ed25519"),
        # The lab's own SSH options (known_hosts, key checking), and with ansible.cfg's after them.
        "LAB_SSH_OPTIONS": shlex.join(ssh_options(lab)[2:]),
        "ANSIBLE_SSH_ARGS": ansible_ssh_args(lab),
        "ANSIBLE_HOME": str(ansible_home),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(ansible_home / "cp"),
        "PATH": venv_path(),
    }


# --- commands ------------------------------------------------------------------------------------


def new_lab(name: str, count: int) -> Lab:
    subnet = choose_subnet(name)
    sid = short_id(name)
    addresses = list(subnet.hosts())
    if count < 1:
        raise LabError(f"a lab needs at least one host, not {count}")
    if count + 10 > len(addresses):
        raise LabError(f"{count} hosts do not fit in {subnet}")
    # Another stack name (a staging stack, say) gives the hosts that name's instance names.
    stack = os.environ.get("GREETER_STACK_NAME") or STACK
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,19}", stack):
        raise LabError(f"GREETER_STACK_NAME {stack!r}: lower-case letters, digits, dashes, <= 20")
    hosts = [
        Host(
            index=i,
            name=f"{stack}-{i + 1}",
            address=str(addresses[10 + i]),
            netns=f"gl-{sid}-{i + 1}",
            veth=f"gl-{sid}-{i + 1}",
            machine=f"gl-{sid}-{i + 1}",
        )
        for i in range(count)
    ]
    return Lab(
        name=name,
        subnet=str(subnet),
        bridge=f"gl-{sid}",
        bridge_address=str(addresses[0]),
        emulator_port=choose_port(name),
        stack=stack,
        hosts=hosts,
    )


def is_up(lab: Lab) -> bool:
    return all(alive(lab.processes.get(f"host-{h.index}")) for h in lab.hosts) and all(
        alive(lab.processes.get(role)) for role in ("emulator", "apt", "git", "wheels")
    )


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    """One `up` or `down` at a time per lab name."""
    LAB_ROOT.mkdir(exist_ok=True)
    with (LAB_ROOT / f"{lab_name()}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cmd_up(count: int) -> None:
    name = lab_name()
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, systemd-nspawn)")
    run(HOST_DEPS)
    started = time.monotonic()
    lab = Lab.load(name)
    if lab is not None and len(lab.hosts) == count and is_up(lab):
        refresh_mirror(lab)
        write_inventory(lab)
        wait_ssh(lab)
        log(f"lab {name} is already up ({count} hosts); mirror now at {lab.commit[:12]}")
        return
    if lab is not None:
        log(f"lab {name} is up with {len(lab.hosts)} hosts or only partly; taking it down first")
        cmd_down()
    image = ensure_image()
    lab = new_lab(name, count)
    lab.image = str(image)
    lab.state.mkdir(parents=True, exist_ok=True)
    lab.save()
    try:
        booted = time.monotonic()
        (lab.state / "ssh").mkdir(mode=0o700)
        keygen(lab.state / "ssh" / "id_ed25519", f"lab-{name}")
        (lab.state / "ssh" / "known_hosts").touch()
        make_network(lab)
        mount_host_tmpfs(lab)
        for host in lab.hosts:
            check_route(host.address, lab.bridge)
            make_host_network(lab, host)
            prepare_root(lab, host, image)
            spawn(
                lab, f"host-{host.index}",
                [sys.executable, __file__, "_host", name, str(host.index)],
                host_dir(lab, host) / "console.log",
            )  # fmt: skip
        refresh_mirror(lab)
        start_services(lab)
        write_inventory(lab)
        wait_ssh(lab)
        wait_port("127.0.0.1", lab.emulator_port, 60, "the AWS emulator")
        servers = {APT_PORT: "apt-cacher-ng", GIT_PORT: "git daemon", WHEEL_PORT: "wheel server"}
        for port, what in servers.items():
            wait_port(lab.bridge_address, port, 10, what)
    except BaseException:
        log(f"up failed; see {lab.state}/logs and {lab.state}/hosts, then run `lab/lab down`")
        raise
    log(
        f"lab {name} up: {count} hosts SSH-ready {time.monotonic() - booted:.1f}s after the image "
        f'was ready ({time.monotonic() - started:.1f}s in all); `eval "$(lab/lab env)"` to use it'
    )


def remove_tree(path: Path) -> None:
    """rmtree that tolerates files vanishing meanwhile (an SSH master removing its socket)."""
    for _ in range(5):
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        raise LabError(f"could not remove {path}")


def close_ssh_masters(lab: Lab) -> None:
    """End the shared SSH connections of `lab ssh` and Ansible (they would outlive the lab)."""
    for socket_path in [
        *(lab.state / "ssh").glob("cm-*"),
        *(lab.state / "ansible" / "cp").glob("*"),
    ]:
        quiet("ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "lab-host")


def cmd_down() -> None:
    name = lab_name()
    lab = Lab.load(name)
    if lab is None:
        log(f"lab {name} is not up")
        return
    started = time.monotonic()
    close_ssh_masters(lab)
    services = [r for role, r in lab.processes.items() if not role.startswith("host-")]
    terminate(services)  # they stop while the hosts power off
    hosts = [r for role, r in lab.processes.items() if role.startswith("host-")]
    stop(hosts, HOST_STOP_TIMEOUT)
    for host in lab.hosts:  # anything left in a host's cgroups was started by that host
        cgroup = cgroup_name(lab, host)
        for pid in cgroup_pids(cgroup):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    stop(services)
    for host in lab.hosts:
        root = host_dir(lab, host) / "root"
        if os.path.ismount(root):
            # nspawn's lock for the root directory outlives it; it is named after the mount.
            st = root.stat()
            with contextlib.suppress(OSError):
                (NSPAWN_RUN / "locks" / f"inode-{st.st_dev}:{st.st_ino}").unlink()
            if not quiet("umount", root):
                quiet("umount", "--lazy", root)
        ip(f"link del {host.veth}", check=False)  # first: `netns del` is asynchronous
        ip(f"netns del {host.netns}", check=False)
        deadline = time.monotonic() + 2
        while cgroup_pids(cgroup_name(lab, host)) and time.monotonic() < deadline:
            time.sleep(0.05)
        remove_cgroups(cgroup_name(lab, host))
        for leftover in ("propagate", "unix-export"):
            with contextlib.suppress(OSError):
                shutil.rmtree(NSPAWN_RUN / leftover / host.machine)
    hosts = lab.state / "hosts"
    if os.path.ismount(hosts) and not quiet("umount", hosts):
        quiet("umount", "--lazy", hosts)
    ip(f"link del {lab.bridge}", check=False)
    for leftover in ("locks", "propagate", ""):  # nspawn's own bookkeeping, once no lab uses it
        with contextlib.suppress(OSError):
            (NSPAWN_RUN / leftover).rmdir()
    remove_tree(lab.state)
    log(f"lab {name} down in {time.monotonic() - started:.1f}s")


def cmd_status() -> int:
    lab = Lab.load(lab_name())
    if lab is None:
        print(f"lab {lab_name()}: down")
        return 3
    print(
        f"lab {lab.name}: subnet {lab.subnet} on {lab.bridge}, "
        f"AWS emulator 127.0.0.1:{lab.emulator_port}"
    )
    for role in ("emulator", "apt", "git", "wheels"):
        print(f"  {role:<9} {'running' if alive(lab.processes.get(role)) else 'STOPPED'}")
    for host in lab.hosts:
        state = "running" if alive(lab.processes.get(f"host-{host.index}")) else "STOPPED"
        print(f"  {host.name:<12} {host.address:<15} {state}")
    return 0 if is_up(lab) else 1


def cmd_env() -> None:
    lab = Lab.load(lab_name())
    if lab is None:
        raise LabError(f"lab {lab_name()} is not up: run `lab/lab up` first")
    for key, value in environment(lab).items():
        print(f"export {key}={shlex.quote(value)}")


def cmd_ssh(target: str, command: list[str]) -> None:
    lab = Lab.load(lab_name())
    if lab is None:
        raise LabError(f"lab {lab_name()} is not up")
    for host in lab.hosts:
        if target in (host.name, host.address, str(host.index + 1)):
            check_route(host.address, lab.bridge)
            # One shared connection per host makes repeated `lab ssh` calls cheap; `down` ends it.
            mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={lab.state / 'ssh' / 'cm-%C'}"]
            argv = [*ssh_command(lab, host), *mux, "-o", "ControlPersist=60", *command]
            os.execvp(argv[0], argv)  # noqa: S606 - the user's interactive session
    raise LabError(f"no host {target!r} in lab {lab.name}: {', '.join(h.name for h in lab.hosts)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab/lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N hosts (default 3) and the lab's services")
    up.add_argument("count", nargs="?", type=int, default=3)
    sub.add_parser("down", help="stop everything the lab started and remove its state")
    sub.add_parser("status", help="show the lab's hosts and services")
    sub.add_parser("env", help="print the `export` lines of the lab environment")
    ssh = sub.add_parser("ssh", help="open SSH to a host (name, index or address)")
    ssh.add_argument("host")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)
    host = sub.add_parser("_host")  # internal: the per-host supervisor
    host.add_argument("name")
    host.add_argument("index", type=int)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            with lab_lock():
                cmd_up(args.count)
        elif args.command == "down":
            with lab_lock():
                cmd_down()
        elif args.command == "status":
            return cmd_status()
        elif args.command == "env":
            cmd_env()
        elif args.command == "ssh":
            cmd_ssh(args.host, args.cmd)
        elif args.command == "_host":
            return run_host(args.name, args.index)
    except LabError as err:
        print(f"lab: error: {err}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:
        print(
            f"lab: error: {shlex.join(map(str, err.cmd))} failed with exit code {err.returncode}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
