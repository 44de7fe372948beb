"""The lab's EC2 side: boot each lab host when the emulator runs its instance, as EC2 would.

    .venv/bin/python lab/launcher.py LAB_NAME

Started by ``lab/lab up`` next to the emulator (it needs boto3, hence the project's venv). It
imports the lab's SSH public key as the key pair ``lab-<name>`` (what ``greeter_stack_key_name``
selects in the lab's inventory), then watches the emulator: when instance ``<stack>-<i>`` runs,
it seeds lab host *i*'s cloud-init (NoCloud) from what the emulator says about that instance:
its instance id, its Name tag as the hostname, and the public key of the key pair it was launched
with, plus the lab's busy first boot as user-data. Then it tells the host's supervisor to boot,
and once cloud-init has made the host's SSH keys, pins the new ed25519 key in the lab's
known_hosts (an operator reads the same key from EC2's console output).

A host is launched once, by the first instance of its name; it is not relaunched if the stack
later replaces the instance.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labctl.common import LabError
from labctl.hosts import host_dir, launch_marker
from labctl.state import Host, Lab

POLL_SECONDS = 0.5


def ec2_client(lab: Lab):
    return boto3.client(
        "ec2",
        endpoint_url=f"http://127.0.0.1:{lab.emulator_port}",
        region_name=lab.region,  # LAB_REGION at `up`, the region `lab env` exports
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - the emulator's dummy credentials
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )


def import_lab_key(ec2, lab: Lab) -> None:
    """The lab's key as an EC2 key pair, retried until the emulator answers."""
    name = f"lab-{lab.name}"
    material = (lab.state / "ssh" / "id_ed25519.pub").read_bytes()
    deadline = time.monotonic() + 60
    while True:
        try:
            known = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])
            if not known["KeyPairs"]:
                ec2.import_key_pair(KeyName=name, PublicKeyMaterial=material)
                print(f"imported the lab's key as key pair {name}", flush=True)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_SECONDS)


def public_key(ec2, key_name: str) -> list[str]:
    """The key pair's public key, as EC2 hands it to cloud-init (none without a key pair)."""
    if not key_name:
        return []
    pairs = ec2.describe_key_pairs(KeyNames=[key_name], IncludePublicKey=True)["KeyPairs"]
    return [pairs[0]["PublicKey"].strip()]


def user_data(busy_boot: float) -> str:
    """The lab's busy first boot: cloud-init's final stage holds dpkg's locks for a while, as a
    first boot's package upgrade (or apt-daily, unattended-upgrades) does, while SSH answers."""
    lines = ["#cloud-config"]
    if busy_boot > 0:
        lines += ["runcmd:", f"  - [/usr/local/sbin/lab-hold-dpkg-lock, '{busy_boot:g}']"]
    return "\n".join(lines) + "\n"


def seed(lab: Lab, host: Host, instance: dict, keys: list[str]) -> None:
    """Write the NoCloud seed into the host's root, then the marker its supervisor waits for."""
    d = host_dir(lab, host)
    nocloud = d / "root" / "var" / "lib" / "cloud" / "seed" / "nocloud"
    nocloud.mkdir(parents=True, exist_ok=True)
    meta = {
        "instance-id": instance["InstanceId"],
        "local-hostname": host.name,
        "public-keys": keys,
    }
    (nocloud / "meta-data").write_text(json.dumps(meta, indent=2) + "\n")  # JSON is YAML
    (nocloud / "user-data").write_text(user_data(lab.busy_boot))
    marker = {"instance_id": instance["InstanceId"], "key_name": instance.get("KeyName", "")}
    tmp = d / "launch.json.tmp"
    tmp.write_text(json.dumps(marker) + "\n")
    tmp.replace(launch_marker(lab, host))
    print(f"{host.name}: launched as {instance['InstanceId']}, key pair {marker['key_name']!r}")


def pin_host_key(lab: Lab, host: Host) -> bool:
    """Add the host's ed25519 key to the lab's known_hosts once cloud-init has made it."""
    pub = host_dir(lab, host) / "root" / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
    try:
        text = pub.read_text()
    except OSError:
        return False
    if not text.endswith("\n"):
        return False  # still being written
    with (lab.state / "ssh" / "known_hosts").open("a") as out:
        out.write(f"{host.address} {' '.join(text.split()[:2])}\n")
    print(f"{host.name}: pinned its SSH host key", flush=True)
    return True


def running_instances(ec2, names: list[str]) -> dict[str, dict]:
    """Name tag -> instance, for the running instances of those names (oldest first wins)."""
    found: dict[str, dict] = {}
    filters = [
        {"Name": "tag:Name", "Values": names},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    for reservation in ec2.describe_instances(Filters=filters)["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
            found.setdefault(tags.get("Name", ""), instance)
    return found


def main(argv: list[str]) -> int:
    lab = Lab.load(argv[1])
    if lab is None:
        raise LabError(f"lab {argv[1]} has no state")
    ec2 = ec2_client(lab)
    import_lab_key(ec2, lab)
    # The backends <stack>-1 .. <stack>-N and, with `up --balancer`, the balancer <stack>-lb.
    unlaunched = {h.name: h for h in lab.machines if not launch_marker(lab, h).exists()}
    unpinned = [h for h in lab.machines if h.name not in unlaunched and not pinned_already(lab, h)]
    while True:
        if unlaunched:
            try:
                for name, instance in running_instances(ec2, list(unlaunched)).items():
                    host = unlaunched.pop(name)
                    seed(lab, host, instance, public_key(ec2, instance.get("KeyName", "")))
                    unpinned.append(host)
            except Exception as error:
                print(f"emulator: {error}", flush=True)
        unpinned = [h for h in unpinned if not pin_host_key(lab, h)]
        time.sleep(POLL_SECONDS)


def pinned_already(lab: Lab, host: Host) -> bool:
    """Whether the lab's known_hosts pins this host already (a restarted launcher)."""
    known = lab.state / "ssh" / "known_hosts"
    return known.exists() and any(
        line.split()[:1] == [host.address] for line in known.read_text().splitlines()
    )


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv))
