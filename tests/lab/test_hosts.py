"""The lab's hosts behave like fresh cloud VMs: own identity, systemd running, reboots survived."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import LabSession

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.lab


def test_every_host_answers_ssh_with_its_own_identity(lab: LabSession) -> None:
    identities = {}
    for host in lab.hosts:
        out = lab.ssh(
            host, "hostname; cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"
        ).stdout.split("\n")
        hostname, machine_id, fingerprint = out[0], out[1], out[2].split()[1]
        assert hostname == host.name
        identities[host.name] = (machine_id, fingerprint)
    machine_ids = {m for m, _ in identities.values()}
    fingerprints = {f for _, f in identities.values()}
    assert len(machine_ids) == len(lab.hosts), identities
    assert len(fingerprints) == len(lab.hosts), identities


def test_systemd_is_the_init_and_the_system_is_running(lab: LabSession) -> None:
    for host in lab.hosts:
        state = lab.ssh(host, "systemctl is-system-running --wait", check=False).stdout.strip()
        failed = lab.ssh(host, "systemctl --failed --no-legend", check=False).stdout
        assert state == "running", f"{host.name}: {state}\n{failed}"
        assert lab.ssh(host, "ps -p 1 -o comm=").stdout.strip() == "systemd"


def test_the_user_ubuntu_has_passwordless_sudo(lab: LabSession) -> None:
    for host in lab.hosts:
        assert lab.ssh(host, "id -un; sudo -n id -u").stdout.split() == ["ubuntu", "0"]


def test_the_image_is_a_fresh_cloud_image_without_what_the_role_installs(lab: LabSession) -> None:
    """python3 and git are there; python3-venv, pip and compilers are left to the role."""
    image = Path(json.loads((lab.state / "lab.json").read_text())["image"])
    admindir = image / "var" / "lib" / "dpkg"

    def installed(package: str) -> bool:
        status = subprocess.run(
            ["dpkg-query", f"--admindir={admindir}", "-W", "-f=${db:Status-Status}", package],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return status == "installed"

    for package in ("python3", "git", "openssh-server", "sudo", "systemd-sysv"):
        assert installed(package), package
    for package in ("python3-venv", "python3-pip", "gcc", "build-essential"):
        assert not installed(package), package
    assert not (image / "usr" / "lib" / "python3.11" / "ensurepip").exists()


def test_a_rebooted_host_comes_back(lab: LabSession) -> None:
    host = lab.hosts[-1]
    before = lab.ssh(host, "cat /proc/sys/kernel/random/boot_id").stdout.strip()
    lab.ssh(host, "sudo systemctl reboot", check=False)  # the connection drops: any exit is fine
    deadline = time.monotonic() + 60
    while True:
        probe = lab.ssh(
            host,
            "systemctl is-system-running --wait; cat /proc/sys/kernel/random/boot_id",
            check=False,
        )
        lines = probe.stdout.split()
        if probe.returncode == 0 and lines and lines[-1] != before:
            break
        assert time.monotonic() < deadline, f"{host.name} did not come back: {probe.stderr}"
        time.sleep(0.5)
    assert lines == ["running", lines[-1]]
    assert lab.ssh(host, "hostname").stdout.strip() == host.name
    console = (lab.state / "hosts" / host.name / "console.log").read_text()
    assert "the guest rebooted; booting it again" in console


def test_routes_lead_nowhere_beyond_the_lab_bridge(lab: LabSession) -> None:
    """Inspect the routing tables (never send traffic out): only the lab subnet is reachable."""
    subnet = ipaddress.ip_network(lab.subnet)
    for host in lab.hosts:
        routes4 = json.loads(lab.ssh(host, "ip -j -4 route show table all").stdout)
        routes6 = json.loads(lab.ssh(host, "ip -j -6 route show table all").stdout)
        for route in routes4 + routes6:
            assert route["dst"] != "default", f"{host.name} has a default route: {route}"
            assert "gateway" not in route, f"{host.name} routes through a gateway: {route}"
        for route in routes4:
            if route.get("type", "unicast") == "unicast":
                assert route.get("dev") == "eth0"
                assert ipaddress.ip_network(route["dst"]).subnet_of(subnet), route
        for route in routes6:
            dst = ipaddress.ip_network(route["dst"])
            assert (
                dst.is_link_local or dst.is_multicast or dst.is_loopback or dst.prefixlen == 128
            ), route
        # and from the controller's side, the host's address goes through the lab bridge only
        out = subprocess.run(
            ["ip", "-j", "route", "get", host.address], capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout)[0]["dev"] == lab.bridge


def test_lab_command_refuses_unknown_hosts(lab: LabSession) -> None:
    result = lab.run(str(REPO / "lab" / "lab"), "ssh", "no-such-host", "true", check=False)
    assert result.returncode == 1
    assert "no host 'no-such-host'" in result.stderr
