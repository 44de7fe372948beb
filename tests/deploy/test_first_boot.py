"""A deploy onto hosts still busy with their first boot, as fresh Ubuntu EC2 instances are: SSH
answers while cloud-init runs, and dpkg's lock is held for about a minute (the lab's default busy
first boot). The role waits for both, bounded, and says what it waited for when the bound runs
out; nothing is deployed on a host it gave up on."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from support.ansible import recap
from support.lab import output

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab

LAB_NAME = "boot"


@pytest.fixture(scope="module")
def busy(extra_lab: Callable[..., LabSession]) -> LabSession:
    """Two hosts with the lab's default busy first boot, provisioned a moment ago."""
    return extra_lab(LAB_NAME, 2, busy_boot=None)


def nothing_deployed(lab: LabSession, host_index: int) -> bool:
    """No build or release under /opt/greeter (empty or absent; the deploy lock is in the
    account, not on a host)."""
    return lab.ssh(lab.hosts[host_index], NOTHING_DEPLOYED, check=False).returncode == 0


NOTHING_DEPLOYED = 'test -z "$(sudo ls -A /opt/greeter 2>/dev/null)"'


def nothing_switched(lab: LabSession, host_index: int) -> bool:
    """No current release and no service: whatever was prepared, nothing serves."""
    return (
        lab.ssh(
            lab.hosts[host_index],
            "! sudo test -e /opt/greeter/current && ! systemctl is-active --quiet greeter.service",
            check=False,
        ).returncode
        == 0
    )


def test_the_first_deploy_waits_for_the_busy_boot_and_a_short_bound_names_cloud_init(
    busy: LabSession,
) -> None:
    """One deploy right after provisioning, while both hosts are busy: the first waits (default
    bound), the second has a 5 s bound and fails naming cloud-init. The prepare play stops the
    whole run at a failed host, so nothing is switched anywhere."""
    first, second = busy.hosts
    status = busy.ssh(first, "cloud-init status", check=False).stdout
    assert "status: running" in status, status  # SSH answers before cloud-init is done
    bound = busy.state / "inventory" / "host_vars" / f"{second.name}.yml"
    original = bound.read_text()
    bound.write_text(original + "greeter_boot_timeout: 5\n")
    try:
        result = busy.playbook("playbooks/deploy.yml", "-v", check=False)
    finally:
        bound.write_text(original)
    text = " ".join(output(result).split())
    assert result.returncode != 0, text[-3000:]
    assert re.search(
        rf"{second.name}: \"Wait for cloud-init and dpkg's lock\" failed: cloud-init had not "
        r"finished the host's boot after 5 s \(greeter_boot_timeout\)",
        text,
    ), text[-3000:]
    waited = re.search(
        rf"ok: \[{first.name}\] => ansible_job_id: \S+ attempts: \d+ .{{0,600}}?"
        r"waited: cloud_init: ([0-9.]+) dpkg_lock: ([0-9.]+)",
        text,
    )
    assert waited, text[-3000:]
    assert float(waited.group(1)) > 0, waited.group(0)  # cloud-init was still running
    # The first host waited and prepared its release, but the run stopped before any switch.
    assert nothing_switched(busy, 0)
    assert nothing_deployed(busy, 1)


def test_after_the_wait_the_deploy_succeeds_and_a_rerun_changes_nothing(busy: LabSession) -> None:
    first = busy.hosts[0]
    deploy = busy.playbook("playbooks/deploy.yml", "--limit", first.name)
    assert recap(deploy.stdout)[first.name]["failed"] == 0
    again = busy.playbook("playbooks/deploy.yml", "--limit", first.name)
    assert recap(again.stdout)[first.name]["changed"] == 0, again.stdout[-3000:]
    settled = " ".join(again.stdout.split())
    assert re.search(  # a settled host: no wait
        rf"Start waiting for cloud-init and dpkg's lock\] \*+ .{{0,200}}?"
        rf"skipping: \[{first.name}\]",
        settled,
    ), settled[-3000:]


def test_a_held_dpkg_lock_blocks_apt_and_a_short_bound_names_its_holder(busy: LabSession) -> None:
    """After cloud-init: an unattended-upgrades run, say, holding dpkg's lock."""
    host = busy.hosts[1]
    busy.ssh(host, "cloud-init status --wait")
    busy.ssh(
        host,
        "sudo systemd-run --unit=lab-apt-busy /usr/local/sbin/lab-hold-dpkg-lock 600 && "
        "until sudo journalctl -u lab-apt-busy | grep -q holding; do sleep 0.2; done",
    )
    try:
        # What the lab holds is what apt waits for (a flock would not stop it).
        apt = busy.ssh(
            host,
            "sudo apt-get -o DPkg::Lock::Timeout=2 install -y --no-download python3-venv",
            check=False,
        )
        assert apt.returncode != 0
        assert "lock-frontend" in output(apt), output(apt)
        result = busy.playbook(
            "playbooks/deploy.yml", "--limit", host.name, "-e", "greeter_boot_timeout=5",
            check=False,
        )  # fmt: skip
        text = " ".join(output(result).split())
        assert result.returncode != 0, text[-3000:]
        assert re.search(
            r"dpkg's lock \(/var/lib/dpkg/lock-frontend, /var/lib/dpkg/lock\) was still held "
            r"after 5 s \(greeter_boot_timeout\) by pid \d+ \(/usr/bin/python3 "
            r"/usr/local/sbin/lab-hold-dpkg-lock 600\)",
            text,
        ), text[-3000:]
        assert nothing_deployed(busy, 1)
    finally:
        busy.ssh(host, "sudo systemctl stop lab-apt-busy", check=False)
