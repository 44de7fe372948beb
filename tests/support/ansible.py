"""Reading ansible-playbook's output, and SSH options that really apply."""

from __future__ import annotations

import re

RECAP = re.compile(r"^(\S+)\s+:\s+(ok=\d+(?:\s+\w+=\d+)*)\s*$", re.MULTILINE)


def recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counters per host (ok, changed, unreachable, failed, skipped, rescued,
    ignored), from the last recap in the output."""
    tail = output.rsplit("PLAY RECAP", 1)[-1] if "PLAY RECAP" in output else ""
    return {
        host: {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", counters)}
        for host, counters in RECAP.findall(tail)
    }


def with_ssh_options(env: dict[str, str], *options: str) -> dict[str, str]:
    """A copy of ``env`` whose Ansible SSH connections use ``options`` (e.g. "-o",
    "ServerAliveInterval=2").

    OpenSSH keeps the FIRST value it is given for an option, and Ansible puts ``ssh_args``
    (ANSIBLE_SSH_ARGS, else ansible.cfg's) before ``ssh_common_args``: an option appended to
    ANSIBLE_SSH_COMMON_ARGS that ansible.cfg also sets is silently ignored. So the options go
    in front of ANSIBLE_SSH_ARGS (which `lab/lab env` sets). Give the run a fresh
    ANSIBLE_SSH_CONTROL_PATH_DIR too: a master connection opened earlier keeps its options.
    """
    if "ANSIBLE_SSH_ARGS" not in env:
        raise ValueError("no ANSIBLE_SSH_ARGS in this environment: not a `lab/lab env` one?")
    changed = dict(env)
    changed["ANSIBLE_SSH_ARGS"] = " ".join([*options, env["ANSIBLE_SSH_ARGS"]])
    return changed
