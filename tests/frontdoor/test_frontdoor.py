"""The front door on lab hosts: one balancer (HAProxy, roles/greeter_lb) in front of the fleet.

One lab (3 backends + the balancer host, LAB_NAME ``front``) shared by every test in file
order: the first site.yml builds the whole front door, later ones take a host out of the
stack, add it back, rerun with nothing to change, reload the balancer and lose it. The front
door through failed releases and interrupted runs is test_frontdoor_incidents.py, on a lab of
its own (the two files run side by side). Clients here are plain: ONE channel to
the balancer, retries disabled (tests/frontdoor/plain_client.py), and h2load as an independent
HTTP/2 client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from front_support import (
    BACKENDS,
    PLAIN_CLIENT,
    REPO,
    Counters,
    H2load,
    PlainClient,
    at_balancer,
    drained_through_restart,
    front,
    leaves_rotation,
    out_at,
    probe_rows,
    set_at_balancer,
    wait_all_up,
)
from support.ansible import recap

if TYPE_CHECKING:
    from support.lab import LabSession

pytestmark = pytest.mark.lab

LAB_NAME = os.environ.get("LAB_FRONTDOOR_NAME", "front")


# --- the shared fleet ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(extra_lab: Callable[..., LabSession]) -> Iterator[LabSession]:
    """Three lab backends and the balancer host."""
    yield extra_lab(LAB_NAME, 3, balancer=True)


# --- the tests, in order -------------------------------------------------------------------------


def test_site_puts_a_front_door_before_the_fleet(fleet: LabSession) -> None:
    result = fleet.playbook("site.yml")
    table = result.stdout
    shown = table[table.index("TASK [Show the table]") :].split("\nTASK [")[0]
    print(f"\n[frontdoor] the first site.yml's probe table:\n{shown}", flush=True)
    # The probe's table: the front door first, each host UP at the balancer.
    assert re.search(rf"{re.escape(front(fleet))}\s+yes\s+SERVING.*front-door", table), table
    for host in fleet.hosts:
        assert re.search(rf"{re.escape(host.address)}:50051\s+yes\s+SERVING.*\sUP", table), table
    assert sorted(at_balancer(fleet)) == BACKENDS
    # The stack's balancer instance, alone in its group, at the lab's balancer host.
    graph = fleet.run("ansible-inventory", "--graph", "greeter_lb").stdout
    assert [line.strip(" |-") for line in graph.splitlines()[1:]] == [fleet.balancer.name]
    hello = fleet.run("greeter", "hello", fleet.balancer.address, "Teste")
    assert hello.stdout.strip() == "Olá, Teste!"


def test_one_channel_spreads_calls_over_every_backend(fleet: LabSession) -> None:
    done = fleet.run(sys.executable, str(PLAIN_CLIENT), front(fleet), "24", "--calls", "3000")
    report = json.loads(done.stdout)
    assert report["failures"] == [] and report["ok"] == 3000, report
    shares = {host: n / 3000 for host, n in report["answered"].items()}
    print(f"\n[frontdoor] share of 3000 calls on one channel: {shares}", flush=True)
    assert sorted(shares) == BACKENDS
    assert all(0.25 <= share <= 0.42 for share in shares.values()), shares


def test_a_rolling_upgrade_fails_no_call_of_a_plain_client_or_h2load(
    fleet: LabSession, tmp_path: Path
) -> None:
    new = fleet.push_commit(tmp_path, "front door upgrade")
    with (
        Counters(fleet) as counters,
        PlainClient(fleet) as plain,
        H2load(fleet, tmp_path) as h2load,
    ):
        time.sleep(2)
        started = time.monotonic()
        result = fleet.playbook(
            "playbooks/deploy.yml", "-e", f"greeter_version={new}", "-e", '{"greeter_serial": [1]}'
        )
        upgraded = time.monotonic() - started
        time.sleep(2)
    print(f"\n[frontdoor timing] rolling upgrade of 3 hosts: {upgraded:.1f} s", flush=True)
    ended = recap(result.stdout)
    for name in BACKENDS:
        assert ended[name]["failed"] == 0
        # Drained at the balancer and put back, by HAProxy's own counters: no new call from
        # before its restart until its new server was ready.
        print(f"[frontdoor] {drained_through_restart(fleet, counters, name)}", flush=True)
    assert counters.most_out_at_once() == 1  # batches of one
    calls = plain.report["ok"] + len(plain.failures)
    print(f"[frontdoor] plain client: {calls} calls, {len(plain.failures)} failed", flush=True)
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 500
    print(f"[frontdoor] h2load: {h2load.calls} calls in {len(h2load.runs)} runs", flush=True)
    assert h2load.problems == [], h2load.problems
    assert h2load.calls > 500
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    assert {row["commit"] for row in rows} == {new}


@pytest.mark.parametrize("fault", ["kill -9", "network cut"])
def test_a_dead_backend_leaves_rotation_within_3_s_and_later_calls_all_succeed(
    fleet: LabSession, fault: str
) -> None:
    wait_all_up(fleet, BACKENDS)
    victim = fleet.hosts[1] if fault == "kill -9" else fleet.hosts[2]
    with PlainClient(fleet) as plain:
        time.sleep(2)
        watcher = leaves_rotation(fleet, victim.name)
        if fault == "kill -9":
            # The time of the kill is read on the host (one clock for every lab host): the SSH
            # round trip to start the command is not the balancer's time.
            killed = fleet.ssh(
                victim, "date +%s.%N && sudo systemctl kill --signal=SIGKILL greeter.service"
            )
            faulted = float(killed.stdout.split()[0])
        else:
            faulted = time.time()
            subprocess.run(["ip", "link", "set", victim.veth, "down"], check=True)
        out = out_at(watcher)
        time.sleep(6)  # calls sent after it left: they must all succeed (5 s deadline each)
        if fault == "network cut":
            subprocess.run(["ip", "link", "set", victim.veth, "up"], check=True)
    took = out - faulted
    between = [f for f in plain.failures if f[0] < out]
    print(
        f"\n[frontdoor] {fault}: out of rotation after {took:.2f} s; "
        f"{len(between)} of {plain.report['ok'] + len(plain.failures)} calls failed in between "
        f"({sorted({f[2] for f in between})})",
        flush=True,
    )
    assert took <= 3.0
    after = [f for f in plain.failures if f[0] >= out]
    assert after == [], after[:10]
    assert plain.report["ok"] > 200
    wait_all_up(fleet, BACKENDS, timeout=60)  # systemd restarts it / the link is back


def test_a_host_removed_from_the_stack_leaves_the_balancer_and_one_added_joins_the_rotation(
    fleet: LabSession,
) -> None:
    # The stack shrinks to two instances: greeter-3's instance is terminated and the next run's
    # balancer configuration no longer lists it (the lab host itself keeps running).
    fleet.playbook("site.yml", "-e", "greeter_stack_instance_count=2")
    assert sorted(at_balancer(fleet)) == BACKENDS[:2]
    # Back to three: a new instance greeter-3 (mapped to the same lab host, whose release is still
    # in place, so its deploy finds it in the wanted state) becomes a backend and goes UP.
    fleet.playbook("site.yml")
    wait_all_up(fleet, BACKENDS)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ("greeter_lb_port=70000", "greeter_lb_port and greeter_lb_backend_port must be within"),
        ("greeter_tls_enabled=true", "greeter-1, greeter-2, greeter-3 serve(s) TLS only"),
    ],
)
def test_bad_input_stops_the_balancer_play_before_haproxy_changes(
    fleet: LabSession, extra: str, said: str
) -> None:
    """A wrong value, or backends that would serve TLS only (which the balancer's cleartext calls
    and checks cannot pass), fail the balancer's preflight: HAProxy's files stay as they were and
    the front door keeps answering."""
    files = "sudo sha1sum /etc/haproxy/haproxy.cfg /etc/systemd/system/haproxy.service.d/*"
    before = fleet.ssh(fleet.balancer.name, files).stdout
    result = fleet.playbook("playbooks/balancer.yml", "-e", extra, check=False)
    assert result.returncode == 2, result.stdout[-3000:]
    assert said in result.stdout and "Nothing was changed" in result.stdout, result.stdout[-3000:]
    assert recap(result.stdout)["greeter-lb"]["changed"] == 0
    assert fleet.ssh(fleet.balancer.name, files).stdout == before
    hello = fleet.run("greeter", "hello", fleet.balancer.address, "Teste")
    assert hello.stdout.strip() == "Olá, Teste!"


def test_tls_at_the_front_door_serves_a_plain_client_and_turns_off_again(
    fleet: LabSession, tmp_path: Path
) -> None:
    """greeter_lb_tls_enabled: a plain client that knows only the CA (one secure channel, no
    retries) gets every call answered, spread over every backend; a cleartext call is refused;
    the probe calls the front door over TLS; a rerun changes nothing. Turned off, the front door
    speaks cleartext again and the key leaves the host."""
    lb = fleet.balancer
    pki = tmp_path / "pki"
    python = str(REPO / ".venv" / "bin" / "python")
    fleet.run(python, "lab/tls.py", "--dir", str(pki), "--san", lb.address, "--san", lb.name)
    tls = {
        "greeter_lb_tls_enabled": True,
        "greeter_lb_tls_cert_src": str(pki / "server.pem"),
        "greeter_lb_tls_key_src": str(pki / "server.key"),
        "greeter_lb_tls_ca_src": str(pki / "ca.pem"),
    }
    # A key that is not the certificate's fails the preflight: nothing reaches the host, and the
    # front door goes on serving as before.
    wrong = json.dumps({**tls, "greeter_lb_tls_key_src": str(pki / "client.key")})
    refused = fleet.playbook("playbooks/balancer.yml", "-e", wrong, check=False)
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert "is not the unencrypted PEM private key" in refused.stdout
    assert recap(refused.stdout)["greeter-lb"]["changed"] == 0
    pem = "sudo test -e /etc/haproxy/greeter-lb.pem"
    assert fleet.ssh(lb.name, pem, check=False).returncode == 1
    assert fleet.run("greeter", "hello", lb.address, "x").stdout.strip() == "Olá, x!"

    tls = json.dumps(tls)
    on = fleet.playbook("playbooks/balancer.yml", "-e", tls)
    assert recap(on.stdout)["greeter-lb"]["changed"] > 0
    key = "sudo stat -c '%a %U' /etc/haproxy/greeter-lb.pem"
    assert fleet.ssh(lb.name, key).stdout.split() == ["600", "root"]

    args = [sys.executable, str(PLAIN_CLIENT), front(fleet), "8", "--calls", "600"]
    report = json.loads(fleet.run(*args, "--ca", str(pki / "ca.pem")).stdout)
    assert report["failures"] == [] and report["ok"] == 600, report
    assert sorted(report["answered"]) == BACKENDS
    clear = fleet.run("greeter", "hello", lb.address, "x", "--deadline", "3", check=False)
    assert clear.returncode == 3, clear.stdout + clear.stderr

    probe = fleet.playbook("playbooks/probe.yml", "-e", tls)
    assert re.search(rf"{re.escape(front(fleet))}\s+yes\s+SERVING.*front-door", probe.stdout)
    again = fleet.playbook("playbooks/balancer.yml", "-e", tls)
    assert recap(again.stdout)["greeter-lb"]["changed"] == 0

    off = fleet.playbook("playbooks/balancer.yml")
    assert recap(off.stdout)["greeter-lb"]["changed"] > 0
    assert fleet.run("greeter", "hello", lb.address, "x").stdout.strip() == "Olá, x!"
    assert fleet.ssh(lb.name, pem, check=False).returncode == 1


def test_a_rerun_changes_nothing_on_the_hosts_or_the_balancer(fleet: LabSession) -> None:
    started = time.monotonic()
    result = fleet.playbook("site.yml")
    print(f"\n[frontdoor timing] no-op site.yml: {time.monotonic() - started:.1f} s", flush=True)
    counters = recap(result.stdout)
    for name in [*BACKENDS, "greeter-lb"]:
        assert counters[name]["changed"] == 0, (name, result.stdout[-4000:])
    assert "Set the host at the balancer" not in result.stdout  # no hook ran: nobody was drained


def test_a_balancer_reload_fails_no_call_and_keeps_a_drained_backend_drained(
    fleet: LabSession,
) -> None:
    """A configuration change reloads HAProxy under a plain client's load: no call fails, and a
    backend drained before the reload is still drained after it (the new process starts from the
    states the old one had), then the saved states are gone."""
    wait_all_up(fleet, BACKENDS)
    set_at_balancer(fleet, "greeter-3", "drain")
    pid = "sudo systemctl show -p MainPID --value haproxy.service"
    master = fleet.ssh(fleet.balancer.name, pid).stdout
    with PlainClient(fleet) as plain:
        time.sleep(2)
        started = time.monotonic()
        reload = fleet.playbook("playbooks/balancer.yml", "-e", "greeter_lb_maxconn=8001")
        took = time.monotonic() - started
        time.sleep(2)
    calls = plain.report["ok"] + len(plain.failures)
    print(
        f"\n[frontdoor] balancer reload ({took:.1f} s run): plain client {calls} calls, "
        f"{len(plain.failures)} failed",
        flush=True,
    )
    assert "RUNNING HANDLER [greeter_lb : Reload haproxy]" in reload.stdout, reload.stdout[-3000:]
    assert fleet.ssh(fleet.balancer.name, pid).stdout == master  # reloaded, not restarted
    assert at_balancer(fleet)["greeter-3"]["status"] == "DRAIN"
    assert plain.failures == [], plain.failures[:10]
    assert plain.report["ok"] > 200
    saved = "sudo test -e /run/haproxy/server-state"
    assert fleet.ssh(fleet.balancer.name, saved, check=False).returncode == 1
    # Back as it was: the default configuration (another reload), every backend in rotation.
    set_at_balancer(fleet, "greeter-3", "ready")
    fleet.playbook("playbooks/balancer.yml")
    wait_all_up(fleet, BACKENDS)


def test_an_unreachable_balancer_fails_the_deploy_naming_it_before_any_drain(
    fleet: LabSession, tmp_path: Path
) -> None:
    """The balancer's link is down: the deploy fails in its state read naming the balancer, not
    a backend, and drains or switches nothing, and so does a rollback; the backends keep
    serving. With the link back, the rerun converges."""
    wait_all_up(fleet, BACKENDS)
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    (old,) = {row["commit"] for row in rows}
    new = fleet.push_commit(tmp_path, "while the balancer is away")
    targets = [f"{host.address}:50051" for host in fleet.hosts]
    assert fleet.balancer.veth, "lab/lab records the balancer's veth"
    subprocess.run(["ip", "link", "set", fleet.balancer.veth, "down"], check=True)
    try:
        started = time.monotonic()
        result = fleet.playbook("playbooks/deploy.yml", "-e", f"greeter_version={new}", check=False)
        took = time.monotonic() - started
        back = fleet.playbook("playbooks/rollback.yml", check=False)  # the same before its drain
        direct = fleet.run("greeter", "probe", *targets, "--json", check=False)
    finally:
        subprocess.run(["ip", "link", "set", fleet.balancer.veth, "up"], check=True)
    output = " ".join((result.stdout + result.stderr).split())
    print(
        f"\n[frontdoor timing] deploy failing at the unreachable balancer: {took:.1f} s", flush=True
    )
    assert result.returncode != 0
    said = "the balancer greeter-lb (group greeter_lb) could not be reached"
    assert said in output, output[-3000:]
    assert "nothing was drained and every host keeps its release" in output
    counters = recap(result.stdout)
    for name in BACKENDS:
        assert counters[name]["unreachable"] == 0, (name, output[-3000:])  # not blamed on them
    assert "Set the host at the balancer" not in result.stdout  # no backend was drained
    assert "lost while preparing" not in output and "lost during the rollout" not in output
    rolled = " ".join((back.stdout + back.stderr).split())
    assert back.returncode != 0 and said in rolled, rolled[-3000:]
    assert "Set the host at the balancer" not in back.stdout
    assert all(recap(back.stdout)[name]["changed"] == 0 for name in BACKENDS), rolled[-3000:]
    # The backends kept serving their release the whole time (called directly, not through it).
    assert direct.returncode == 0, direct.stdout + direct.stderr
    assert {row["commit"] for row in json.loads(direct.stdout)} == {old}
    wait_all_up(fleet, BACKENDS)
    started = time.monotonic()
    fleet.playbook("playbooks/deploy.yml", "-e", f"greeter_version={new}")
    print(f"[frontdoor timing] its rerun: {time.monotonic() - started:.1f} s", flush=True)
    rc, rows = probe_rows(fleet)
    assert rc == 0, rows
    assert {row["commit"] for row in rows} == {new}
    wait_all_up(fleet, BACKENDS)
