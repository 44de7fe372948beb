"""The SSH options the lab and the tests give Ansible really apply.

OpenSSH keeps the FIRST value it is given for an option, and Ansible puts ``ssh_args``
(ansible.cfg's, or ANSIBLE_SSH_ARGS) before ``ssh_common_args``: an option in
ANSIBLE_SSH_COMMON_ARGS that ansible.cfg also sets is silently ignored. These tests read the
effective options back from OpenSSH (``ssh -G`` on the exact command Ansible ran) and check
the lab's host-key pinning by behaviour: an unknown or changed host key is refused.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.ansible import with_ssh_options

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab


def ansible_raw(lab: LabSession, env: dict[str, str], *verbosity: str):
    """`true` on the lab's first host through Ansible's ssh connection (raw: no Python needed)."""
    host = lab.hosts[0]
    return lab.run(
        "ansible", "all", "-i", f"{host.address},", "-u", "ubuntu", "-m", "ansible.builtin.raw",
        "-a", "true", *verbosity, check=False, timeout=120, env=env,
    )  # fmt: skip


def fresh_connection(env: dict[str, str]) -> dict[str, str]:
    """No master connection from an earlier run: it would keep the options it was opened with.
    The folder is a short one of its own under /tmp, not inside tmp_path: a control socket's path
    must fit a Unix socket address (108 bytes), and pytest-xdist's tmp_path is long."""
    return dict(env, ANSIBLE_SSH_CONTROL_PATH_DIR=tempfile.mkdtemp(prefix="cp-"))


def effective_ssh_options(lab: LabSession, env: dict[str, str]) -> dict[str, str]:
    """OpenSSH's own resolution (`ssh -G`) of the command line Ansible executed."""
    result = ansible_raw(lab, env, "-vvv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if "SSH: EXEC " in x)
    argv = shlex.split(line.split("SSH: EXEC ", 1)[1])
    address = lab.hosts[0].address
    options = argv[1 : argv.index(address)]
    options = [o for o in options if o != "-tt"]  # -G prints the config, no terminal needed
    shown = subprocess.run(
        ["ssh", "-G", *options, address], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(" ", 1) for line in shown.splitlines() if " " in line)


def test_the_labs_host_key_pinning_and_the_tests_keep_alive_apply(lab: LabSession) -> None:
    plain = effective_ssh_options(lab, fresh_connection(lab.env))
    assert plain["stricthostkeychecking"] == "true", plain  # the lab's `yes`, not `accept-new`
    assert plain["userknownhostsfile"] == str(lab.state / "ssh" / "known_hosts"), plain
    assert plain["serveraliveinterval"] == "5", plain  # ansible.cfg's, still applied
    keep_alive = ("-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=2")
    env = fresh_connection(with_ssh_options(lab.env, *keep_alive))
    tuned = effective_ssh_options(lab, env)
    assert (tuned["serveraliveinterval"], tuned["serveralivecountmax"]) == ("2", "2"), tuned
    assert tuned["stricthostkeychecking"] == "true", tuned


def known_hosts_env(lab: LabSession, known_hosts: Path) -> dict[str, str]:
    env = with_ssh_options(lab.env, "-o", f"UserKnownHostsFile={known_hosts}")
    return fresh_connection(env)


def test_the_lab_refuses_a_host_whose_key_it_does_not_know(lab: LabSession, tmp_path: Path) -> None:
    """accept-new (ansible.cfg) would trust it and write its key; the lab's `yes` refuses."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    result = ansible_raw(lab, known_hosts_env(lab, known_hosts))
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert "Host key verification failed" in text, text[-3000:]
    assert known_hosts.read_text() == "", "the unknown host's key was trusted and written"


def test_the_lab_refuses_a_host_whose_key_changed(lab: LabSession, tmp_path: Path) -> None:
    host = lab.hosts[0]
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")],
        check=True,
    )
    impostor = (tmp_path / "impostor.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{host.address} {' '.join(impostor)}\n")
    result = ansible_raw(lab, known_hosts_env(lab, known_hosts))
    text = result.stdout + result.stderr
    assert result.returncode != 0, text
    assert re.search(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed", text)
