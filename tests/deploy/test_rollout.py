"""Rollout safety on lab hosts: a release is (commit, configuration), the bake window, rescue,
unreachable hosts, no mixed fleet, one deploy at a time and the deploy history (issue 11).

Two labs, each shared by its tests in file order (each test starts from the fleet the previous
one left): ``rollout-cfg``, 2 hosts, for what one release does on a host (configuration, TLS,
bake, rescue); ``rollout-fleet``, 3 hosts, for what a run does to the fleet (lost hosts,
batches, revert, the lock, the history). Every test here fails on the role before issue 11.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.ansible import recap

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
    lines = lab.ssh(lab.hosts[index], "cat /opt/greeter/history.jsonl").stdout.splitlines()
    return [json.loads(line) for line in lines]


def push_commit(lab: LabSession, tmp: Path, message: str, edit: Callable[[Path], None]) -> str:
    """Commit a change on top of the mirror's main in a scratch clone; push it as a branch."""
    clone = tmp / f"clone-{time.monotonic_ns()}"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "clone", "--quiet", str(lab.git_mirror), str(clone)], check=True)
    edit(clone)
    subprocess.run([*git, "-C", str(clone), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(clone), "commit", "--quiet", "-m", message], check=True)
    sha = subprocess.run(
        ["git", "-C", str(clone), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(
        ["git", "-C", str(clone), "push", "--quiet", "origin", f"HEAD:refs/heads/t/{sha[:12]}"],
        check=True,
    )
    return sha


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


# --- lab 1: what a release is, on 2 hosts --------------------------------------------------------


@pytest.fixture(scope="module")
def pair(extra_lab: Callable[[str, int], LabSession]) -> LabSession:
    """Two fresh hosts with the stack created in the lab's emulator; nothing deployed yet."""
    lab = extra_lab("rollout-cfg", 2)
    lab.playbook("playbooks/provision.yml")
    return lab


def test_a_first_release_that_cannot_start_says_there_is_nothing_to_return_to(
    pair: LabSession, tmp_path: Path
) -> None:
    broken = push_commit(pair, tmp_path, "Refuse to start", patch_server(REFUSES_TO_START))
    result = deploy(pair, "-e", f"greeter_version={broken}", "-e", "greeter_verify_timeout=5",
                    check=False)  # fmt: skip
    out = text(result)
    assert result.returncode != 0
    assert re.search(rf"greeter-1: release {broken}-[0-9a-f]{{12}} failed \(", out), out[-3000:]
    assert "there is no earlier release on this host to return to" in out, out[-3000:]
    assert "greeter-1 serves nothing (does not serve)" in out, out[-3000:]
    assert switched(result.stdout) == [["greeter-1"]]  # greeter-2 was never touched
    assert pair.ssh(pair.hosts[1], "test ! -e /opt/greeter/current", check=False).returncode == 0
    # The lock was released although the run failed: the next run proceeds.
    deploy(pair)
    assert serves(pair) == [lab_commit(pair)] * 2


def test_a_config_only_change_that_cannot_start_goes_back_to_the_exact_previous_release(
    pair: LabSession,
) -> None:
    """TLS with a key that does not match the certificate: same commit, new configuration."""
    good = certificates(pair, "tls")
    other = certificates(pair, "tls-other")
    before = releases(pair)
    result = deploy(pair, "-e", tls_vars(good, key_from=other), "-e", "greeter_verify_timeout=5",
                    check=False)  # fmt: skip
    out = text(result)
    assert result.returncode != 0
    commit = lab_commit(pair)
    new = re.search(rf"greeter-1: release ({commit}-[0-9a-f]{{12}}) failed", out)
    assert new, out[-3000:]
    assert new[1] != before[0]  # a configuration change is a new release of the same commit
    assert f"rolled back to {before[0]}, which serves again" in out, out[-3000:]
    assert switched(result.stdout) == [["greeter-1"]]
    assert releases(pair) == before
    assert serves(pair) == [commit] * 2  # plaintext, the configuration that served before
    last = history(pair, 0)[-1]
    assert (last["from"], last["to"], last["outcome"]) == (before[0], new[1], "rolled back")


def test_a_tls_rolling_upgrade_of_two_hosts_then_a_rerun_changes_nothing_then_rollback(
    pair: LabSession,
) -> None:
    good = certificates(pair, "tls")
    plaintext = releases(pair)
    commit = lab_commit(pair)
    result = deploy(pair, "-e", tls_vars(good), "-e", '{"greeter_serial": 1}')
    assert switched(result.stdout) == [["greeter-1"], ["greeter-2"]]
    assert serves(pair, "--ca", good["ca.pem"]) == [commit] * 2
    assert probe(pair)[0] != 0  # TLS only: a plaintext client gets nothing
    rerun = deploy(pair, "-e", tls_vars(good), "-e", '{"greeter_serial": 1}')
    assert [c["changed"] for c in recap(rerun.stdout).values()] == [0, 0], rerun.stdout
    # The previous release is the plaintext pair: rolling back restores the configuration too.
    assert [release(pair, i, "previous") for i in range(2)] == plaintext
    pair.playbook("playbooks/rollback.yml")
    assert releases(pair) == plaintext
    assert serves(pair) == [commit] * 2


def test_a_new_commit_failing_under_new_config_returns_to_the_old_code_and_old_config(
    pair: LabSession, tmp_path: Path
) -> None:
    before = releases(pair)
    broken = push_commit(pair, tmp_path, "Refuse to start", patch_server(REFUSES_TO_START))
    result = deploy(pair, "-e", f"greeter_version={broken}", "-e", "greeter_log_level=debug",
                    "-e", "greeter_verify_timeout=5", check=False)  # fmt: skip
    assert result.returncode != 0
    assert f"rolled back to {before[0]}, which serves again" in text(result)
    assert releases(pair) == before
    # The old code runs under the old configuration: what its process was started with.
    environ = pair.ssh(
        pair.hosts[0],
        "sudo cat /proc/$(systemctl show -p MainPID --value greeter)/environ | tr '\\0' '\\n'",
    ).stdout.splitlines()
    assert "GREETER_LOG_LEVEL=info" in environ, environ
    assert serves(pair) == [lab_commit(pair)] * 2


def test_a_release_that_dies_3_s_after_it_first_serves_is_caught_in_its_batch(
    pair: LabSession, tmp_path: Path
) -> None:
    before = releases(pair)
    dying = push_commit(pair, tmp_path, "Die 3 s after serving", patch_server(DIES_AFTER_3_S))
    result = deploy(pair, "-e", f"greeter_version={dying}", check=False)
    out = text(result)
    assert result.returncode != 0
    assert re.search(r"stopped serving [0-9.]+ s into the 5 s bake window", out), out[-3000:]
    assert f"rolled back to {before[0]}, which serves again" in out, out[-3000:]
    assert switched(result.stdout) == [["greeter-1"]]
    assert releases(pair) == before
    assert serves(pair) == [lab_commit(pair)] * 2


# --- lab 2: what a run does to a fleet of 3 -----------------------------------------------------


@pytest.fixture(scope="module")
def fleet(extra_lab: Callable[[str, int], LabSession]) -> LabSession:
    """Three hosts serving the lab's commit."""
    lab = extra_lab("rollout-fleet", 3)
    lab.playbook("playbooks/provision.yml")
    deploy(lab)
    return lab


def test_two_deploys_started_together_exactly_one_proceeds(fleet: LabSession) -> None:
    args = ["ansible-playbook", "playbooks/deploy.yml"]
    runs = [
        subprocess.Popen(args, cwd=REPO, env=fleet.env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes[0] == 0 and codes[1] != 0, outputs
    refused = text(outputs[[run.returncode for run in runs].index(codes[1])])
    controller = socket.gethostname()
    assert re.search(
        rf"Another deploy holds the fleet's lock: \S+ on {re.escape(controller)}, "
        rf"version {lab_commit(fleet)}, started 20\d\d-\d\d-\d\dT[0-9:]+Z\. Nothing was changed",
        refused,
    ), refused[-3000:]
    assert "Read the host's deployment state" not in refused  # refused before touching a host


def test_a_stale_lock_is_broken_only_when_asked(fleet: LabSession) -> None:
    holder = json.dumps(
        {"token": "dead", "user": "ana", "controller": "laptop", "version": "v0.9",
         "started": "2026-01-01T00:00:00Z"}
    )  # fmt: skip
    fleet.ssh(
        fleet.hosts[0],
        f"sudo mkdir /opt/greeter/deploy.lock && echo '{holder}' "
        "| sudo tee /opt/greeter/deploy.lock/holder.json >/dev/null",
    )
    refused = deploy(fleet, check=False)
    assert refused.returncode != 0
    assert (
        "Another deploy holds the fleet's lock: ana on laptop, version v0.9, "
        "started 2026-01-01T00:00:00Z" in text(refused)
    ), text(refused)[-3000:]
    broke = deploy(fleet, "-e", "greeter_lock_break=true")
    assert "Broke the deploy lock" in text(broke)
    gone = fleet.ssh(fleet.hosts[0], "test ! -e /opt/greeter/deploy.lock", check=False)
    assert gone.returncode == 0


def test_a_host_unreachable_while_preparing_stops_every_host_before_any_switch(
    fleet: LabSession, tmp_path: Path
) -> None:
    before = releases(fleet)
    new = push_commit(fleet, tmp_path, "Upgrade", lambda c: (c / "UPGRADE").write_text("1\n"))
    link = veth(fleet, 2)
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        result = fleet.run("ansible-playbook", "playbooks/deploy.yml", "-e",
                           f"greeter_version={new}", check=False)  # fmt: skip
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    out = text(result)
    assert result.returncode != 0
    assert "greeter-3: lost while preparing, before any host switched" in out, out[-3000:]
    assert recap(result.stdout)["greeter-3"]["unreachable"] == 1
    assert switched(result.stdout) == []
    assert releases(fleet)[:2] == before[:2]
    time.sleep(2)
    assert serves(fleet) == [lab_commit(fleet)] * 3


def test_a_host_lost_in_a_batch_of_2_stops_the_rollout_after_that_batch(
    fleet: LabSession, tmp_path: Path
) -> None:
    before = releases(fleet)
    new = push_commit(fleet, tmp_path, "Upgrade", lambda c: (c / "UPGRADE").write_text("2\n"))
    link = veth(fleet, 1)
    args = ["ansible-playbook", "playbooks/deploy.yml", "-e", f"greeter_version={new}",
            "-e", '{"greeter_serial": [2, 1]}']  # fmt: skip
    lines: list[str] = []
    down = False
    with subprocess.Popen(args, cwd=REPO, env=quick_loss_env(fleet, tmp_path), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as play:  # fmt: skip
        assert play.stdout is not None
        for line in play.stdout:
            lines.append(line)
            # The first batch (greeter-1, greeter-2) starts switching: greeter-2 goes away.
            if not down and line.startswith("TASK [greeter : Switch current"):
                subprocess.run(["ip", "link", "set", link, "down"], check=True)
                down = True
        rc = play.wait(timeout=600)
    subprocess.run(["ip", "link", "set", link, "up"], check=True)
    output = "".join(lines)
    out = text(output)
    assert rc != 0
    assert "greeter-2: lost during the rollout" in out, out[-3000:]
    assert recap(output)["greeter-2"]["unreachable"] == 1
    # greeter-3 (the next batch) was never touched; greeter-1 switched and was put back.
    assert all("greeter-3" not in batch for batch in switched(output))
    assert release(fleet, 2) == before[2]
    assert release(fleet, 0) == before[0]
    assert "greeter-1: the run stopped after this host switched" in out, out[-3000:]
    time.sleep(2)
    deploy(fleet, "-e", f"greeter_version={new}")
    assert serves(fleet) == [new] * 3


def test_a_second_batch_failing_puts_the_first_back_unless_told_to_keep_it(
    fleet: LabSession, tmp_path: Path
) -> None:
    before = releases(fleet)
    served = serves(fleet)[0]
    picky = push_commit(fleet, tmp_path, "greeter-1 only", patch_server(STARTS_ON_GREETER_1_ONLY))
    args = ("-e", f"greeter_version={picky}", "-e", '{"greeter_serial": [1, 2]}',
            "-e", "greeter_verify_timeout=5")  # fmt: skip
    result = deploy(fleet, *args, check=False)
    out = text(result)
    assert result.returncode != 0
    assert switched(result.stdout) == [["greeter-1"], ["greeter-2", "greeter-3"]]
    reverted = (
        rf"greeter-1: the run stopped after this host switched to {picky}-[0-9a-f]{{12}}; "
        rf"reverted to {before[0]}, which serves again"
    )
    assert re.search(reverted, out), out[-3000:]
    assert "Every host serves one commit." in out
    assert releases(fleet) == before
    assert serves(fleet) == [served] * 3
    # Kept for debugging: the run ends with a mixed fleet and says who serves what.
    kept = deploy(fleet, *args, "-e", "greeter_revert_on_failure=false", check=False)
    out = text(kept)
    assert kept.returncode != 0
    assert f"greeter-1 serves {picky}, greeter-2 serves {served}, greeter-3 serves {served}" in out
    assert "The hosts do not all serve one commit" in out, out[-3000:]
    assert serves(fleet) == [picky, served, served]
    deploy(fleet, "-e", f"greeter_version={served}")
    assert serves(fleet) == [served] * 3


def test_the_history_records_every_activation_rollback_and_revert(fleet: LabSession) -> None:
    entries = history(fleet, 0)
    assert [e["action"] for e in entries].count("revert") >= 1
    assert {"activated", "reverted"} <= {e["outcome"] for e in entries}
    controller = socket.gethostname()
    for entry in entries:
        assert re.fullmatch(r"20\d\d-\d\d-\d\dT[0-9:]+Z", entry["time"])
        assert entry["operator"].endswith(f"@{controller}")
        assert re.fullmatch(RELEASE, entry["to"]) and entry["config"] == entry["to"][41:]
    # Append-only: a rollback adds one line per host and keeps every earlier one.
    before = [history(fleet, i) for i in range(3)]
    fleet.playbook("playbooks/rollback.yml", "-e", f"greeter_rollback_to={lab_commit(fleet)}")
    for index, earlier in enumerate(before):
        after = history(fleet, index)
        assert after[: len(earlier)] == earlier
        assert len(after) == len(earlier) + 1 and after[-1]["action"] == "rollback"
    logs = text(fleet.playbook("playbooks/logs.yml", "-e", "greeter_history_lines=4"))
    shown = re.findall(rf"greeter-\d rollback {RELEASE} -> {RELEASE}: activated", logs)
    assert len(shown) == 3, logs[-3000:]
    probe_out = text(fleet.playbook("playbooks/probe.yml"))
    now = releases(fleet)
    for index in range(3):
        assert re.search(rf"{now[index]} since 20\d\d-\d\d-\d\dT[0-9:]+Z \(rollback by ", probe_out)
