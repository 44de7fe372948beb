"""Lab hosts boot like EC2 instances: cloud-init (NoCloud) seeded from the emulator's view of each
instance makes the `ubuntu` user, its key pair's key, sudo and the SSH host keys; a stack that
names another key pair gives hosts nobody here can log in to, and provision says so."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support import emulator
from support.lab import output

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab


def ec2(lab: LabSession):
    return emulator.client(lab.env["AWS_ENDPOINT_URL"], "ec2", lab.env["AWS_REGION"])


def instances(lab: LabSession) -> dict[str, dict]:
    """Name tag -> the emulator's running instance."""
    found = {}
    filters = [{"Name": "instance-state-name", "Values": ["running"]}]
    for reservation in ec2(lab).describe_instances(Filters=filters)["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            found[tags.get("Name", "")] = instance
    return found


def test_the_image_has_no_user_no_key_and_no_host_keys(lab: LabSession) -> None:
    """What cloud-init makes at first boot is not baked into the image."""
    image = Path(json.loads((lab.state / "lab.json").read_text())["image"])
    assert "ubuntu:" not in (image / "etc" / "passwd").read_text()
    assert not (image / "home" / "ubuntu").exists()
    assert not list((image / "etc" / "sudoers.d").glob("*cloud-init*"))
    assert not list((image / "etc" / "ssh").glob("ssh_host_*"))
    assert (image / "usr" / "bin" / "cloud-init").exists()


def test_cloud_init_seeds_each_host_from_its_instance_and_key_pair(lab: LabSession) -> None:
    running = instances(lab)
    key_name = f"lab-{lab.name}"
    pair = ec2(lab).describe_key_pairs(KeyNames=[key_name], IncludePublicKey=True)["KeyPairs"][0]
    lab_key = (lab.state / "ssh" / "id_ed25519.pub").read_text().split()[:2]
    assert pair["PublicKey"].split()[:2] == lab_key  # the lab's key, imported as a key pair
    host_keys = set()
    for host in lab.hosts:
        instance = running[host.name]
        assert instance["KeyName"] == key_name
        out = lab.ssh(
            host,
            "cloud-init status --wait >/dev/null; cloud-init status; "
            "cat /var/lib/cloud/data/instance-id; hostname; cat ~/.ssh/authorized_keys; "
            "sudo -n cat /etc/sudoers.d/90-cloud-init-users; cat /etc/ssh/ssh_host_ed25519_key.pub",
        ).stdout.splitlines()
        assert out[0] == "status: done", out
        assert out[1] == instance["InstanceId"]
        assert out[2] == host.name
        assert next(line.split()[:2] for line in out if line.startswith("ssh-ed25519")) == lab_key
        assert any("ubuntu ALL=(ALL) NOPASSWD:ALL" in line for line in out), out
        host_keys.add(out[-1].split()[1])
        # the key the lab pins is the one cloud-init made on this host
        known = (lab.state / "ssh" / "known_hosts").read_text().splitlines()
        assert f"{host.address} {' '.join(out[-1].split()[:2])}" in known
    assert len(host_keys) == len(lab.hosts)  # made per host at its first boot


def test_a_stack_with_another_key_pair_fails_provision_naming_it_and_deploys_nothing(
    extra_lab: Callable[..., LabSession], tmp_path: Path
) -> None:
    lab = extra_lab("keys", 1, busy_boot=0, provision=False)
    other = tmp_path / "someone-else"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "someone-else", "-f", str(other)],
        check=True,
    )
    ec2(lab).import_key_pair(
        KeyName="someone-else", PublicKeyMaterial=Path(f"{other}.pub").read_bytes()
    )
    result = lab.playbook(
        "site.yml",
        "-e", "greeter_stack_key_name=someone-else",
        "-e", "greeter_stack_ssh_timeout=30",
        check=False,
    )  # fmt: skip
    text = output(result)
    assert result.returncode != 0, text[-3000:]
    assert "answers SSH but refused the login" in text, text[-3000:]
    assert 'It was launched with key pair "someone-else"' in text, text[-3000:]
    assert 'greeter_stack_key_name: "someone-else"' in text, text[-3000:]
    assert "TASK [greeter" not in text  # the deploy never started
    root = lab.state / "hosts" / lab.hosts[0].name / "root"
    keys = (root / "home" / "ubuntu" / ".ssh" / "authorized_keys").read_text()
    assert Path(f"{other}.pub").read_text().split()[1] in keys  # the key pair the stack named
    assert not (root / "opt" / "greeter").exists()
