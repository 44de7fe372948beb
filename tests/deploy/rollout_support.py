"""Helpers of the rollout-safety tests (test_rollout_release.py, test_rollout_fleet.py)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
RELEASE = r"[0-9a-f]{40}-[0-9a-f]{12}"


# --- helpers -------------------------------------------------------------------------------------


def text(result: subprocess.CompletedProcess | str) -> str:
    """The output with the YAML callback's line folding undone."""
    raw = result if isinstance(result, str) else result.stdout + result.stderr
    return " ".join(raw.split())


def release(lab: LabSession, index: int, link: str = "current") -> str:
    """The release id (<commit>-<config digest>) a host's current (or previous) link names."""
    target = lab.ssh(lab.hosts[index], f"readlink /opt/greeter/{link}").stdout.strip()
    return target.rsplit("/", 1)[-1]


def releases(lab: LabSession) -> list[str]:
    return [release(lab, i) for i in range(len(lab.hosts))]


def probe(lab: LabSession, *extra: str) -> tuple[int, list[dict]]:
    """`greeter probe --json` of every host from the controller: one channel each, no retries."""
    targets = [f"{host.address}:50051" for host in lab.hosts]
    result = lab.run("greeter", "probe", *targets, "--json", *extra, check=False)
    return result.returncode, json.loads(result.stdout or "[]")


def serves(lab: LabSession, *extra: str) -> list[str]:
    """The commit every host serves; fails unless every host passes the probe."""
    rc, rows = probe(lab, *extra)
    assert rc == 0, rows
    return [row["commit"] for row in rows]


def served_releases(lab: LabSession, *extra: str) -> list[str]:
    """The release (<commit>-<config digest>) every host's server reports (GetVersion), as
    `greeter probe` shows it; fails unless every host passes the probe."""
    rc, rows = probe(lab, *extra)
    assert rc == 0, rows
    return [row["release"] for row in rows]


def switched(output: str) -> list[list[str]]:
    """Hosts per batch that ran the switch task, read from the run's output."""
    found, collecting = [], None
    for line in output.splitlines():
        if line.startswith("TASK [greeter : Switch current"):
            collecting = []
            found.append(collecting)
        elif line.startswith(("TASK [", "PLAY ")):
            collecting = None
        elif collecting is not None:
            match = re.match(r"^(?:ok|changed): \[(\S+)\]", line)
            if match:
                collecting.append(match[1])
    return [sorted(batch) for batch in found if batch]


def history(lab: LabSession, index: int) -> list[dict]:
    lines = lab.ssh(lab.hosts[index], "sudo cat /opt/greeter/history.jsonl").stdout.splitlines()
    return [json.loads(line) for line in lines]


def patch_server(code: str) -> Callable[[Path], None]:
    """An edit that appends `code` to the server module of the release."""

    def edit(clone: Path) -> None:
        server = clone / "service" / "src" / "greeter" / "server.py"
        server.write_text(server.read_text() + "\n\n" + code)

    return edit


REFUSES_TO_START = """
def main(argv=None):  # a release that never starts
    raise SystemExit("this release refuses to start")
"""

# Serves, tells systemd it is ready, and dies 3 s later (systemd then restarts it: it serves
# again a few seconds later, which a one-shot health check in a later batch would believe).
DIES_AFTER_3_S = """
_serving_notify = _notify


def _notify(state):  # a release that dies 3 s after it first serves
    _serving_notify(state)
    if state == "READY=1":
        import threading

        threading.Timer(3.0, os._exit, args=(1,)).start()
"""

STARTS_ON_GREETER_1_ONLY = """
_all_hosts_main = main


def main(argv=None):  # a release that starts on greeter-1 only
    import socket

    if socket.gethostname() != "greeter-1":
        raise SystemExit("this release starts on greeter-1 only")
    return _all_hosts_main(argv)
"""


def deploy(lab: LabSession, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return lab.playbook("playbooks/deploy.yml", *args, check=check)


def lab_commit(lab: LabSession) -> str:
    return json.loads((lab.state / "lab.json").read_text())["commit"]


def veth(lab: LabSession, index: int) -> str:
    return json.loads((lab.state / "lab.json").read_text())["hosts"][index]["veth"]


def lock_name(lab: LabSession) -> str:
    """The fleet's deploy lock: an SSM parameter named after the lab's stack."""
    return f"/greeter/{lab.env['GREETER_STACK_NAME']}/deploy-lock"


def ssm(lab: LabSession) -> Any:
    """A boto3 SSM client of the lab's emulator (AWS_ENDPOINT_URL from the lab's environment)."""
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
    endpoint, key, secret, region = (lab.env[k] for k in keys)
    return boto3.client(
        "ssm",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


def lock_holder(lab: LabSession) -> dict | None:
    """The lock's record, or None when nobody holds it."""
    found = ssm(lab).get_parameters(Names=[lock_name(lab)])["Parameters"]
    return json.loads(found[0]["Value"]) if found else None


def run_id(output: str) -> str:
    """The run id a run says it holds the lock under."""
    match = re.search(r"This is run ([0-9a-f]{16}); it holds the deploy lock", text(output))
    assert match, text(output)[-3000:]
    return match[1]


def quick_loss_env(lab: LabSession, tmp: Path) -> dict[str, str]:
    """The lab's environment with a fresh SSH master, so a host that drops off is noticed soon."""
    env = dict(lab.env)
    env["ANSIBLE_TIMEOUT"] = "10"
    env["ANSIBLE_SSH_CONTROL_PATH_DIR"] = str(tmp / "cp")
    return env


def certificates(lab: LabSession, folder: str) -> dict[str, str]:
    """A CA, a server certificate for every lab host, and their files (lab/tls.py)."""
    where = lab.state / folder
    sans = [arg for host in lab.hosts for arg in ("--san", host.name, "--san", host.address)]
    lab.run(str(REPO / ".venv" / "bin" / "python"), "lab/tls.py", "--dir", str(where), *sans)
    return {name: str(where / name) for name in ("ca.pem", "server.pem", "server.key")}


def tls_vars(cert: dict[str, str], key_from: dict[str, str] | None = None) -> str:
    return json.dumps(
        {
            "greeter_tls_enabled": True,
            "greeter_tls_cert_src": cert["server.pem"],
            "greeter_tls_key_src": (key_from or cert)["server.key"],
            "greeter_tls_ca_src": cert["ca.pem"],
        }
    )
