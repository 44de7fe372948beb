"""lab/labctl's safety rules and names, checked without bringing a lab up."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "lab"))  # the lab's package, standard library only

from labctl import cli, common, hosts, inventory, network, services, state  # noqa: E402 - after the path above


def test_an_address_that_does_not_leave_through_the_lab_bridge_is_refused() -> None:
    # `ip route get` only consults the routing table: nothing is sent anywhere.
    with pytest.raises(common.LabError, match=r"refusing 127\.0\.0\.1"):
        network.check_route("127.0.0.1", "gl-nosuch")
    default = json.loads(
        subprocess.run(["ip", "-j", "route", "get", "198.51.100.7"], capture_output=True,
                       text=True, check=True).stdout
    )[0]  # fmt: skip
    with pytest.raises(common.LabError, match="not the lab bridge"):
        network.check_route("198.51.100.7", default["dev"])  # right device, but via a gateway


def test_a_subnet_the_machine_already_routes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = network.routed_networks()
    assert any(net.overlaps(ipaddress.ip_network("127.0.0.0/8")) for net in taken)
    monkeypatch.setenv("LAB_SUBNET", "127.0.0.0/24")
    with pytest.raises(common.LabError, match="overlaps a network in use"):
        network.choose_subnet("demo")


def test_derived_subnets_avoid_every_routed_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAB_SUBNET", raising=False)
    subnet = network.choose_subnet("some-lab")
    assert subnet.prefixlen == 24
    assert subnet.subnet_of(ipaddress.ip_network("10.213.0.0/16"))
    assert not any(subnet.overlaps(net) for net in network.routed_networks())


@pytest.mark.parametrize("name", ["demo", "test", "a-very-long-lab-name-for-ci-42"])
def test_interface_names_fit_the_kernel_limit(name: str) -> None:
    for i in (1, 5):
        iface = f"gl-{common.short_id(name)}-{i}"
        assert len(iface) <= 15, iface
    assert common.short_id("demo") == "demo"
    assert common.short_id("a-very-long-lab-name-for-ci-42") != common.short_id("a-very-long-lab-x")


@pytest.mark.parametrize("bad", ["Demo", "demo lab", "../etc", "x" * 33, "demo;rm", "dé", "-x"])
def test_unsafe_lab_names_are_refused(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAB_NAME", bad)
    with pytest.raises(common.LabError, match="LAB_NAME"):
        common.lab_name()


@pytest.mark.parametrize("good", ["demo", "test", "ci-42", "0"])
def test_lab_names_of_letters_digits_and_dashes_are_accepted(
    good: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_NAME", good)
    assert common.lab_name() == good


def lab_in(root: Path, monkeypatch: pytest.MonkeyPatch) -> state.Lab:
    monkeypatch.setattr(state, "LAB_ROOT", root)
    return state.Lab(name="emu", subnet="10.213.250.0/24", bridge="gl-emu", bridge_address="")


def test_the_emulator_binds_a_port_the_kernel_picks_and_the_lab_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No port is chosen ahead of the bind (another socket could take it meanwhile: CI saw a lab
    wait out its emulator); the lab reads the bound port from the emulator's ready file."""
    lab = lab_in(tmp_path, monkeypatch)
    services.start_emulator(lab)
    try:
        assert lab.emulator_port > 0
        assert state.Lab.load("emu").emulator_port == lab.emulator_port
        conn = http.client.HTTPConnection("127.0.0.1", lab.emulator_port, timeout=10)
        conn.request("GET", "/moto-api/")
        assert conn.getresponse().status == 200
    finally:
        state.stop([lab.processes["emulator"]])


def test_an_emulator_that_exits_fails_the_lab_at_once_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nsys.exit('emulator: cannot bind 127.0.0.1:0: no ports')\n")
    monkeypatch.setattr(services, "EMULATOR", broken)
    lab = lab_in(tmp_path, monkeypatch)
    with pytest.raises(common.LabError, match=r"exited before it answered(?s:.)*cannot bind"):
        services.start_emulator(lab)


def test_lab_region_goes_to_the_lab_state_and_lab_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LAB_REGION at `up` is saved with the lab; `lab env` exports it and the lab's group_vars
    leave greeter_stack_region to the environment (the inventory's region lookup reads it)."""
    monkeypatch.setattr(state, "LAB_ROOT", tmp_path)
    monkeypatch.setenv("LAB_REGION", "eu-west-1")
    made = cli.new_lab("regional", 1, balancer=False)
    made.save()
    lab = state.Lab.load("regional")
    assert lab.region == "eu-west-1"
    env = inventory.environment(lab)
    assert (env["AWS_REGION"], env["AWS_DEFAULT_REGION"]) == ("eu-west-1", "eu-west-1")
    monkeypatch.setattr(inventory, "check_route", lambda *_: None)  # no bridge in this test
    inventory.write_inventory(lab)
    group_vars = (lab.state / "inventory" / "group_vars" / "all.yml").read_text()
    assert "greeter_stack_region" not in group_vars
    assert "greeter_stack_key_name: lab-regional" in group_vars

    monkeypatch.delenv("LAB_REGION")
    assert cli.new_lab("plain", 1, balancer=False).region == common.REGION == "us-east-1"
    # A lab saved before LAB_REGION existed loads with the default.
    saved = json.loads((lab.state / "lab.json").read_text())
    del saved["region"]
    (lab.state / "lab.json").write_text(json.dumps(saved))
    assert state.Lab.load("regional").region == "us-east-1"


@pytest.mark.parametrize("bad", ["EU-WEST-1", "eu-west", "eu-west-1; rm", "moon"])
def test_a_lab_region_that_is_no_region_is_refused(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_REGION", bad)
    with pytest.raises(common.LabError, match="LAB_REGION"):
        common.lab_region()


def test_the_launcher_imports_the_lab_key_in_the_lab_region(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import launcher  # noqa: PLC0415 - needs boto3, as the launcher does

    lab = lab_in(tmp_path, monkeypatch)
    lab.region = "eu-west-1"
    (lab.state / "ssh").mkdir(parents=True)
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            str(lab.state / "ssh" / "id_ed25519"),
        ],
        check=True,
    )
    services.start_emulator(lab)
    try:
        ec2 = launcher.ec2_client(lab)
        launcher.import_lab_key(ec2, lab)
        assert ec2.meta.region_name == "eu-west-1"
        assert [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]] == ["lab-emu"]
        lab.region = "us-east-1"
        assert launcher.ec2_client(lab).describe_key_pairs()["KeyPairs"] == []
    finally:
        state.stop([lab.processes["emulator"]])


# --- a lab of 50 hosts ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return process
        assert process.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)


def test_the_git_daemon_keeps_more_than_32_clients_at_once(tmp_path: Path) -> None:
    """git daemon's default drops the 33rd client: 50 hosts cloning at once lost some."""
    port = _free_port()
    daemon = _start(services.git_daemon_command("127.0.0.1", port, str(tmp_path)), port)
    try:
        clients = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(40)]
        time.sleep(1)  # a dropped client's connection is closed by then
        dropped = 0
        for client in clients:
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # still open, waiting for a request
                dropped += client.recv(1) == b""
            client.close()
        assert dropped == 0
    finally:
        daemon.terminate()
        daemon.wait(10)


def test_the_wheel_server_listens_with_a_backlog_for_a_fleet(tmp_path: Path) -> None:
    """http.server's backlog of 5 dropped pip's connections beyond it (a SYN retry each)."""
    (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    port = _free_port()
    argv = [sys.executable, str(services.WHEEL_SERVER), "127.0.0.1", str(port), str(tmp_path)]
    server = _start(argv, port)
    try:
        listening = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert int(listening[2]) >= 200, listening  # Send-Q of a listening socket: its backlog
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/x-1.0-py3-none-any.whl")
        assert connection.getresponse().read() == b"wheel"
    finally:
        server.terminate()
        server.wait(10)


def test_inotify_instances_are_raised_to_fit_the_lab_and_never_lowered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = tmp_path / "max_user_instances"
    monkeypatch.setattr(hosts, "INOTIFY_INSTANCES", limit)
    monkeypatch.setattr(hosts, "inotify_in_use", lambda: 900)
    limit.write_text("1024\n")
    hosts.ensure_inotify(51)  # 50 hosts and the balancer, beside 900 open
    assert int(limit.read_text()) >= 900 + 10 * 51
    limit.write_text("100000\n")
    hosts.ensure_inotify(51)
    assert limit.read_text() == "100000\n"


@pytest.mark.parametrize(
    ("count", "available_mib", "in_memory"), [(3, 10_000, True), (50, 10_000, False)]
)
def test_hosts_write_to_the_disk_when_their_writes_would_not_fit_in_memory(
    count: int,
    available_mib: int,
    in_memory: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mounts: list[tuple] = []
    monkeypatch.setattr(hosts, "run", lambda *args, **kw: mounts.append(args))
    monkeypatch.setattr(hosts, "mem_available_mib", lambda: available_mib)
    monkeypatch.delenv("LAB_HOSTS_ON_DISK", raising=False)
    lab = types.SimpleNamespace(name="x", state=tmp_path, machines=[object()] * count)
    hosts.mount_host_tmpfs(lab)
    assert (tmp_path / "hosts").is_dir()
    assert [m[:3] for m in mounts] == ([("mount", "-t", "tmpfs")] if in_memory else [])
