"""The front door on lab hosts: one balancer (HAProxy, roles/greeter_lb) in front of the fleet.

One lab (3 backends + the balancer host, LAB_NAME ``front``) shared by every test in file
order, as an operator meets them: the first site.yml runs with two hosts in the stack, the next
adds the third, a rerun changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from support.ansible import recap

if TYPE_CHECKING:
    from support.lab import LabSession

pytestmark = pytest.mark.lab

LAB_NAME = os.environ.get("LAB_FRONTDOOR_NAME", "front")
BACKENDS = ["greeter-1", "greeter-2", "greeter-3"]

# --- helpers -------------------------------------------------------------------------------------


def front(lab: LabSession) -> str:
    assert lab.balancer is not None, "lab/lab up gives every lab a balancer host"
    return f"{lab.balancer.address}:50051"


def at_balancer(lab: LabSession) -> dict[str, dict]:
    """Every backend's state and counters at the balancer, read on the balancer host."""
    code = (
        "import csv, io, json, socket; s = socket.socket(socket.AF_UNIX); "
        "s.connect('/run/haproxy/admin.sock'); s.sendall(b'show stat\\n'); "
        "rows = csv.DictReader(io.StringIO(s.makefile().read().lstrip('# '))); "
        "print(json.dumps({r['svname']: r for r in rows if r['pxname'] == 'greeter' "
        "and r['svname'] != 'BACKEND'}))"
    )
    out = lab.ssh(lab.balancer.name, f"sudo python3 -c {shlex.quote(code)}").stdout
    return json.loads(out)


def wait_all_up(lab: LabSession, names: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {n: s["status"] for n, s in at_balancer(lab).items()}
        if sorted(states) == names and all(v.startswith("UP") for v in states.values()):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.5)


# --- the shared fleet ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(extra_lab: Callable[[str, int], LabSession]) -> Iterator[LabSession]:
    """Three lab backends and the balancer host; the stack starts with two backends."""
    yield extra_lab(LAB_NAME, 3)


# --- the tests, in order -------------------------------------------------------------------------


def test_site_puts_a_front_door_before_the_fleet(fleet: LabSession) -> None:
    result = fleet.playbook("site.yml", "-e", "greeter_stack_instance_count=2")
    table = result.stdout
    # The probe's table: the front door first, each host UP at the balancer.
    assert re.search(rf"{re.escape(front(fleet))}\s+yes\s+SERVING.*front-door", table), table
    for host in fleet.hosts[:2]:
        assert re.search(rf"{re.escape(host.address)}:50051\s+yes\s+SERVING.*\sUP", table), table
    assert sorted(at_balancer(fleet)) == BACKENDS[:2]
    hello = fleet.run("greeter", "hello", fleet.balancer.address, "Teste")
    assert hello.stdout.strip() == "Olá, Teste!"


def test_a_host_added_to_the_stack_joins_the_rotation_on_the_next_run(fleet: LabSession) -> None:
    fleet.playbook("site.yml")  # the lab's inventory says 3 hosts
    wait_all_up(fleet, BACKENDS)


def test_a_rerun_changes_nothing_on_the_hosts_or_the_balancer(fleet: LabSession) -> None:
    started = time.monotonic()
    result = fleet.playbook("site.yml")
    print(f"\n[frontdoor timing] no-op site.yml: {time.monotonic() - started:.1f} s", flush=True)
    counters = recap(result.stdout)
    for name in [*BACKENDS, "greeter-lb"]:
        assert counters[name]["changed"] == 0, (name, result.stdout[-4000:])
    assert "Set the host at the balancer" not in result.stdout  # no hook ran: nobody was drained
