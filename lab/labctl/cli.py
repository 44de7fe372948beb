"""The command line: ``lab/lab up [N] | down | status | env | ssh HOST [CMD...]``."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import __doc__ as labctl_doc
from .common import (
    APT_PORT,
    GIT_PORT,
    HOST_DEPS,
    HOST_STOP_TIMEOUT,
    NSPAWN_RUN,
    PACKAGE,
    STACK,
    WHEEL_PORT,
    LabError,
    ip,
    lab_busy_boot,
    lab_distro,
    lab_name,
    lab_region,
    log,
    quiet,
    run,
    short_id,
)
from .hosts import (
    cgroup_name,
    cgroup_pids,
    ensure_inotify,
    host_dir,
    keygen,
    launch_marker,
    mount_host_tmpfs,
    prepare_root,
    remove_cgroups,
    run_host,
    ssh_command,
    wait_ssh,
)
from .image import ensure_image
from .inventory import environment, write_inventory
from .network import (
    check_route,
    choose_subnet,
    make_host_network,
    make_network,
    wait_port,
)
from .services import refresh_mirror, start_services
from .state import Host, Lab, alive, lab_lock, spawn, stop, terminate

SERVICES = ("emulator", "launcher", "apt", "git", "wheels")


def new_lab(name: str, count: int, balancer: bool) -> Lab:
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
    # The stack's balancer instance (<stack>-lb), just below the backends' addresses.
    front = Host(
        index=count,
        name=f"{stack}-lb",
        address=str(addresses[9]),
        netns=f"gl-{sid}-lb",
        veth=f"gl-{sid}-lb",
        machine=f"gl-{sid}-lb",
    )
    return Lab(
        name=name,
        distro=lab_distro(),
        busy_boot=lab_busy_boot(),
        region=lab_region(),
        subnet=str(subnet),
        bridge=f"gl-{sid}",
        bridge_address=str(addresses[0]),
        stack=stack,
        hosts=hosts,
        balancer=front if balancer else None,
    )


def is_up(lab: Lab) -> bool:
    return all(alive(lab.processes.get(f"host-{h.index}")) for h in lab.machines) and all(
        alive(lab.processes.get(role)) for role in SERVICES
    )


def cmd_up(count: int, balancer: bool = False) -> None:
    name = lab_name()
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, systemd-nspawn)")
    run(HOST_DEPS)
    started = time.monotonic()
    lab = Lab.load(name)
    same = (
        lab is not None
        and len(lab.hosts) == count
        and (lab.balancer is not None) == balancer
        and lab.region == lab_region()
    )
    if lab is not None and same and is_up(lab):
        refresh_mirror(lab)
        write_inventory(lab)
        wait_ssh(lab)
        log(f"lab {name} is already up ({count} hosts); mirror now at {lab.commit[:12]}")
        return
    if lab is not None:
        log(f"lab {name} is up with other hosts or only partly; taking it down first")
        cmd_down()
    lab = new_lab(name, count, balancer)
    image = ensure_image(lab.distro)
    lab.image = str(image)
    lab.state.mkdir(parents=True, exist_ok=True)
    lab.save()
    try:
        booted = time.monotonic()
        (lab.state / "ssh").mkdir(mode=0o700)
        keygen(lab.state / "ssh" / "id_ed25519", f"lab-{name}")
        (lab.state / "ssh" / "known_hosts").touch()
        ensure_inotify(len(lab.machines))
        make_network(lab)
        mount_host_tmpfs(lab)
        for host in lab.machines:
            check_route(host.address, lab.bridge)
            make_host_network(lab, host)
            prepare_root(lab, host, image)
            spawn(
                lab, f"host-{host.index}",
                [sys.executable, str(PACKAGE), "_host", name, str(host.index)],
                host_dir(lab, host) / "console.log",
            )  # fmt: skip
        refresh_mirror(lab)
        start_services(lab)
        write_inventory(lab)
        servers = {APT_PORT: "apt-cacher-ng", GIT_PORT: "git daemon", WHEEL_PORT: "wheel server"}
        for port, what in servers.items():
            wait_port(lab.bridge_address, port, 10, what)
    except BaseException:
        log(f"up failed; see {lab.state}/logs and {lab.state}/hosts, then run `lab/lab down`")
        raise
    log(
        f"lab {name} up ({lab.distro}, region {lab.region}, busy first boot {lab.busy_boot:g}s) in "
        f"{time.monotonic() - booted:.1f}s after the image was ready "
        f"({time.monotonic() - started:.1f}s in all). Its {len(lab.machines)} hosts boot when "
        'the stack makes their instances: `eval "$(lab/lab env)"; '
        "ansible-playbook playbooks/provision.yml`"
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
    for host in lab.machines:  # anything left in a host's cgroups was started by that host
        cgroup = cgroup_name(lab, host)
        for pid in cgroup_pids(cgroup):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    stop(services)
    for host in lab.machines:
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
    for role in SERVICES:
        print(f"  {role:<9} {'running' if alive(lab.processes.get(role)) else 'STOPPED'}")
    for host in lab.machines:
        state = "running" if alive(lab.processes.get(f"host-{host.index}")) else "STOPPED"
        if state == "running" and not launch_marker(lab, host).exists():
            state = "running (waiting for its instance)"
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
    for host in lab.machines:
        if target in (host.name, host.address, str(host.index + 1)):
            check_route(host.address, lab.bridge)
            # One shared connection per host makes repeated `lab ssh` calls cheap; `down` ends it.
            mux = ["-o", "ControlMaster=auto", "-o", f"ControlPath={lab.state / 'ssh' / 'cm-%C'}"]
            argv = [*ssh_command(lab, host), *mux, "-o", "ControlPersist=60", *command]
            os.execvp(argv[0], argv)  # noqa: S606 - the user's interactive session
    names = ", ".join(h.name for h in lab.machines)
    raise LabError(f"no host {target!r} in lab {lab.name}: {names}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab/lab", description=labctl_doc.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N hosts (default 3) and the lab's services")
    up.add_argument("count", nargs="?", type=int, default=3)
    up.add_argument(
        "--balancer", action="store_true", help="and a host for the stack's balancer, <stack>-lb"
    )
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
                cmd_up(args.count, args.balancer)
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
