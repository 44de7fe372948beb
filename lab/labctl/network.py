"""Addresses and safety: the lab's subnet, bridge, per-host namespaces and the route check."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import time
import zlib

from .common import LabError, ip, run
from .state import Host, Lab


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


def check_route(address: str, bridge: str) -> None:
    """Refuse to talk to an address unless the machine routes it through the lab's own bridge."""
    out = run("ip", "-j", "route", "get", address, capture_output=True).stdout
    route = json.loads(out)[0]
    if route.get("dev") != bridge or route.get("gateway"):
        raise LabError(
            f"refusing {address}: it routes via {route.get('dev')}, not the lab bridge {bridge}"
        )


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


def wait_port(address: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise LabError(f"{what} did not listen on {address}:{port} within {timeout:.0f}s")
        time.sleep(0.1)
