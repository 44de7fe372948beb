"""The hosts: one overlay root, cgroup and systemd-nspawn supervisor each, and SSH to them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from .common import APT_PORT, CGROUP_ROOTS, SSH_USER, WHEEL_PORT, LabError, log, run
from .network import check_route
from .state import Host, Lab


def host_dir(lab: Lab, host: Host) -> Path:
    return lab.state / "hosts" / host.name


# What a deployed host writes into its overlay (measured: 229 MB, of which 170 MB are apt's
# lists and caches from the role's `apt-get update`), rounded up.
WRITTEN_PER_HOST_MIB = 256


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def mount_host_tmpfs(lab: Lab) -> None:
    """Keep what the hosts write (their overlay upper dirs) in memory: a disposable host's
    writes never need to reach the disk, and `down` then has nothing to flush or delete.

    Unless they would not fit: tmpfs pages cannot be reclaimed on a machine without swap, and
    50 deployed hosts write ~12 GB. When the hosts' writes would take more than half of the
    memory available now, they go to the disk (the page cache can give that back), and `down`
    deletes them. LAB_HOSTS_ON_DISK=1/0 decides instead."""
    hosts = lab.state / "hosts"
    hosts.mkdir(exist_ok=True)
    needed = WRITTEN_PER_HOST_MIB * len(lab.machines)
    choice = os.environ.get("LAB_HOSTS_ON_DISK", "")
    if choice == "1" or (choice != "0" and needed > mem_available_mib() // 2):
        log(f"hosts write to the disk ({len(lab.machines)} hosts: ~{needed} MiB once deployed)")
        return
    size = os.environ.get("LAB_HOSTS_TMPFS_SIZE", "16g")
    run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", f"lab-{lab.name}", hosts)


def cgroup_name(lab: Lab, host: Host) -> str:
    return f"greeter-lab/{host.machine}"


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


def keygen(path: Path, comment: str) -> None:
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path)


def launch_marker(lab: Lab, host: Host) -> Path:
    """Written by lab/launcher.py once the host's instance runs and its seed is in place."""
    return host_dir(lab, host) / "launch.json"


def prepare_root(lab: Lab, host: Host, image: Path) -> None:
    """Mount the host's overlay with its machine-id and the lab's package sources. Its user,
    key and hostname come from cloud-init once its instance runs (lab/launcher.py)."""
    d = host_dir(lab, host)
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    run(
        "mount", "-t", "overlay", "overlay",
        "-o", f"lowerdir={image},upperdir={d / 'upper'},workdir={d / 'work'}", d / "root",
    )  # fmt: skip
    root = d / "root"
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    sources = {"bridge": lab.bridge_address, "apt_port": APT_PORT, "wheel_port": WHEEL_PORT}
    (root / "etc/apt/apt.conf.d/80lab-proxy").write_text(HOST_APT_PROXY.format(**sources))
    (root / "etc/pip.conf").write_text(HOST_PIP_CONF.format(**sources))


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


BOOT_RETRIES = 6

INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
# inotify instances one booted host holds (its systemd, journald, logind, dbus, sshd...):
# 10 measured on a deployed bookworm host (7 on the balancer's), plus room for a deploy's own.
INOTIFY_PER_HOST = 12


def inotify_in_use() -> int:
    """inotify instances open on the machine now (every lab's hosts, any user's; a process
    whose descriptors cannot be read counts none)."""
    count = 0
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            count += sum(1 for fd in fd_dir.iterdir() if os.readlink(fd) == "anon_inode:inotify")
    return count


def ensure_inotify(hosts: int) -> None:
    """Raise fs.inotify.max_user_instances to fit `hosts` more hosts beside what is open now.

    It is one limit per user for the whole machine, and every host's systemd runs as root: the
    Debian default (128, here 1024) is used up by about 60 hosts across all the labs, and a
    host past it fails to boot ("Too many open files"). Only ever raised, never lowered."""
    current = int(INOTIFY_INSTANCES.read_text())
    wanted = inotify_in_use() + INOTIFY_PER_HOST * hosts + 128
    if wanted > current:
        log(f"raising fs.inotify.max_user_instances from {current} to {wanted} for {hosts} hosts")
        INOTIFY_INSTANCES.write_text(f"{wanted}\n")


def nspawn_command(lab: Lab, host: Host) -> list[str]:
    # --console=read-only: nspawn copies the guest's console into console.log. cloud-init writes
    # plenty there; with `passive` nobody read the console's pty, and once its buffer was full
    # the guest's systemd blocked writing to it (a reboot never finished).
    return [
        "systemd-nspawn", "--boot", "--quiet",
        f"--directory={host_dir(lab, host) / 'root'}", f"--machine={host.machine}",
        "--register=no", "--keep-unit", f"--network-namespace-path=/run/netns/{host.netns}",
        "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=read-only",
    ]  # fmt: skip


def run_host(name: str, index: int) -> int:
    """Keep one host running: boot it and boot it again whenever the guest reboots (exit 133)."""
    lab = Lab.load(name)
    if lab is None:
        raise LabError(f"lab {name} has no state")
    host = next(h for h in lab.machines if h.index == index)
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
    # A lab host is an instance that does not exist yet: it boots when the stack makes it.
    while not launch_marker(lab, host).exists():
        if stopping:
            return 0
        time.sleep(0.2)
    failed_starts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(nspawn_command(lab, host), env=env, stdin=subprocess.DEVNULL)
        code = child.wait()
        if code == 133 and not stopping:
            log(f"{host.name}: the guest rebooted; booting it again")
            continue
        # A guest whose systemd could not even start ("Too many open files": every container's
        # systemd takes inotify instances from the machine's one per-user limit, shared by all
        # the labs on it) is booted again a little later, a few times, instead of never.
        if not stopping and time.monotonic() - started < 30 and failed_starts < BOOT_RETRIES:
            failed_starts += 1
            log(f"{host.name}: nspawn exited with {code} at once; booting again in 10 s")
            time.sleep(10)
            if stopping:
                return code
            continue
        log(f"{host.name}: nspawn exited with {code}")
        return code


def wait_ssh(lab: Lab, timeout: float | None = None) -> None:
    """Wait until every launched host answers SSH (a host boots once its instance runs)."""
    # Hosts boot in parallel but share two cores: allow more time for bigger labs.
    timeout = timeout if timeout is not None else 60.0 + 10.0 * len(lab.machines)
    deadline = time.monotonic() + timeout
    pending = {h.name: h for h in lab.machines if launch_marker(lab, h).exists()}
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
