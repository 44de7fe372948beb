"""lab/labctl's safety rules and names, checked without bringing a lab up."""

from __future__ import annotations

import http.client
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "lab"))  # the lab's package, standard library only

from labctl import cli, common, inventory, network, services, state  # noqa: E402 - after the path above


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
