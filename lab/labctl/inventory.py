"""What the controller uses: the lab's inventory source and the ``lab env`` environment."""

from __future__ import annotations

import configparser
import os
import shlex

from .common import APT_PORT, REPO, VENV_BIN, WHEEL_PORT
from .hosts import ssh_options
from .network import check_route
from .state import Lab

INVENTORY_HOSTS = """\
---
# Written by lab/lab up. The hosts come from inventory/aws_ec2.yml; this file only makes
# this folder an inventory source, so that its group_vars/ and host_vars/ apply.
all: {}
"""


INVENTORY_ALL = """\
---
# Written by lab/lab up: the lab's stack parameters and where the hosts get the code. The
# region follows the environment (`lab env`: AWS_REGION), as the inventory does.
greeter_stack_name: {stack}
greeter_stack_instance_count: {count}
# The stack's balancer instance exists when the lab has a host for it (`lab/lab up --balancer`).
greeter_stack_balancer: {balancer}
greeter_stack_key_name: lab-{name}
greeter_stack_admin_cidr: {subnet}
greeter_stack_client_cidr: {subnet}
greeter_repo_url: git://{bridge}/greeter.git
greeter_version: {commit}
"""


INVENTORY_HOST = """\
---
# Written by lab/lab up: instance {name} is backed by a lab host, which the balancer reaches
# at the same address.
ansible_host: {address}
greeter_backend_address: {address}
"""


def write_inventory(lab: Lab) -> None:
    """The second inventory source: lab addresses for the stack's instances, the lab's settings."""
    inv = lab.state / "inventory"
    (inv / "host_vars").mkdir(parents=True, exist_ok=True)
    (inv / "group_vars").mkdir(parents=True, exist_ok=True)
    (inv / "hosts.yml").write_text(INVENTORY_HOSTS)
    (inv / "group_vars" / "all.yml").write_text(
        INVENTORY_ALL.format(
            stack=lab.stack,
            count=len(lab.hosts),
            balancer=str(lab.balancer is not None).lower(),
            name=lab.name,
            subnet=lab.subnet,
            bridge=lab.bridge_address,
            commit=lab.commit,
        )
    )
    for host in lab.machines:
        check_route(host.address, lab.bridge)
        (inv / "host_vars" / f"{host.name}.yml").write_text(
            INVENTORY_HOST.format(name=host.name, address=host.address)
        )


def ansible_ssh_args(lab: Lab) -> str:
    """ANSIBLE_SSH_ARGS: the lab's SSH options, then ansible.cfg's ssh_args.

    OpenSSH keeps the FIRST value of an option, and Ansible puts ssh_args before
    ssh_common_args: in ANSIBLE_SSH_COMMON_ARGS, the lab's StrictHostKeyChecking=yes would lose
    to ansible.cfg's accept-new. Set here (replacing ansible.cfg's ssh_args, so they are repeated
    after the lab's), the lab's options come first and apply.
    """
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO / "ansible.cfg")
    project = config.get("ssh_connection", "ssh_args", fallback="")
    return " ".join([shlex.join(ssh_options(lab)[2:]), project]).strip()


def venv_path() -> str:
    """PATH with the project's virtualenv first (once, however often `lab env` is evaluated)."""
    rest = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":") if p != str(VENV_BIN)]
    return ":".join([str(VENV_BIN), *rest])


def environment(lab: Lab) -> dict[str, str]:
    """What turns a shell into the lab's: AWS API on loopback, lab inventory, lab SSH key."""
    ansible_home = lab.state / "ansible"
    return {
        "LAB_NAME": lab.name,
        # Tests push other commits or branches here; hosts clone it as git://<bridge>/greeter.git.
        "LAB_GIT_MIRROR": str(lab.state / "git" / "greeter.git"),
        "LAB_APT_PROXY": f"http://{lab.bridge_address}:{APT_PORT}",
        "LAB_WHEELHOUSE_URL": f"http://{lab.bridge_address}:{WHEEL_PORT}/",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{lab.emulator_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": lab.region,
        "AWS_DEFAULT_REGION": lab.region,
        "AWS_EC2_METADATA_DISABLED": "true",
        "GREETER_STACK_NAME": lab.stack,
        "ANSIBLE_INVENTORY": f"{REPO / 'inventory'},{lab.state / 'inventory'}",
        "ANSIBLE_PRIVATE_KEY_FILE": str(lab.state / "ssh" / "id_ed25519"),
        # The lab's own SSH options (known_hosts, key checking), and with ansible.cfg's after them.
        "LAB_SSH_OPTIONS": shlex.join(ssh_options(lab)[2:]),
        "ANSIBLE_SSH_ARGS": ansible_ssh_args(lab),
        "ANSIBLE_HOME": str(ansible_home),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(ansible_home / "cp"),
        "PATH": venv_path(),
    }
