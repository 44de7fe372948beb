"""Rollout safety on 2 lab hosts: a release is (commit, configuration), the bake window, rescue.

One lab (``ro-cfg``) shared by these tests in file order, each starting from the fleet the
previous one left. Each fails on the role before issue 11; the last three on the role before
issue 22 (bookkeeping outside the protected block, releases compared by commit only).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rollout_support import (
    DIES_AFTER_3_S,
    REFUSES_TO_START,
    RELEASE,
    certificates,
    deploy,
    history,
    lab_commit,
    patch_server,
    probe,
    release,
    releases,
    served_releases,
    serves,
    switched,
    text,
    tls_vars,
)
from support.ansible import recap

if TYPE_CHECKING:
    from conftest import LabSession

pytestmark = pytest.mark.lab

# --- lab 1: what a release is, on 2 hosts --------------------------------------------------------


@pytest.fixture(scope="module")
def pair(extra_lab: Callable[[str, int], LabSession]) -> LabSession:
    """Two fresh hosts with the stack created in the lab's emulator; nothing deployed yet."""
    lab = extra_lab("ro-cfg", 2)
    lab.playbook("playbooks/provision.yml")
    return lab


def test_a_first_release_that_cannot_start_says_there_is_nothing_to_return_to(
    pair: LabSession, tmp_path: Path
) -> None:
    broken = pair.push_commit(tmp_path, "Refuse to start", patch_server(REFUSES_TO_START))
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
    # Same commit, new configuration: a new release, and greeter probe tells which one runs.
    tls = releases(pair)
    assert all(new != old and new[:40] == old[:40] for new, old in zip(tls, plaintext, strict=True))
    assert served_releases(pair, "--ca", good["ca.pem"]) == tls
    assert probe(pair)[0] != 0  # TLS only: a plaintext client gets nothing
    rerun = deploy(pair, "-e", tls_vars(good), "-e", '{"greeter_serial": 1}')
    assert [c["changed"] for c in recap(rerun.stdout).values()] == [0, 0], rerun.stdout
    # The previous release is the plaintext pair: rolling back restores the configuration too.
    assert [release(pair, i, "previous") for i in range(2)] == plaintext
    pair.playbook("playbooks/rollback.yml")
    assert releases(pair) == plaintext
    assert serves(pair) == [commit] * 2
    assert served_releases(pair) == plaintext


def test_a_new_commit_failing_under_new_config_returns_to_the_old_code_and_old_config(
    pair: LabSession, tmp_path: Path
) -> None:
    before = releases(pair)
    broken = pair.push_commit(tmp_path, "Refuse to start", patch_server(REFUSES_TO_START))
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
    dying = pair.push_commit(tmp_path, "Die 3 s after serving", patch_server(DIES_AFTER_3_S))
    result = deploy(pair, "-e", f"greeter_version={dying}", check=False)
    out = text(result)
    assert result.returncode != 0
    assert re.search(r"stopped serving [0-9.]+ s into the 5 s bake window", out), out[-3000:]
    assert f"rolled back to {before[0]}, which serves again" in out, out[-3000:]
    assert switched(result.stdout) == [["greeter-1"]]
    assert releases(pair) == before
    assert serves(pair) == [lab_commit(pair)] * 2


# --- bookkeeping inside the protected block, and a release compared as (commit, config) ---------

HISTORY = "/opt/greeter/history.jsonl"
# The history path made a directory: the next append fails (the state read leaves it alone).
BREAK_HISTORY = f"test -d {HISTORY} || (sudo mv {HISTORY} {HISTORY}.kept && sudo mkdir {HISTORY})"
MEND_HISTORY = f"test ! -d {HISTORY} || (sudo rmdir {HISTORY} && sudo mv {HISTORY}.kept {HISTORY})"


def release_dirs(lab: LabSession, index: int) -> set[str]:
    return set(lab.ssh(lab.hosts[index], "ls /opt/greeter/releases").stdout.split())


def test_a_host_whose_history_cannot_be_written_goes_back_and_pruning_keeps_what_the_revert_needs(
    pair: LabSession,
) -> None:
    """greeter-1 activates a configuration change and prunes with greeter_keep_releases=1;
    greeter-2 cannot append to its history, so it goes back; the stopped run reverts greeter-1,
    whose previous release (from before the run) the prune had to keep."""
    before = releases(pair)
    previous = release(pair, 0, "previous")
    assert re.fullmatch(RELEASE, previous) and previous != before[0], previous
    pair.ssh(pair.hosts[1], BREAK_HISTORY)
    result = deploy(pair, "-e", "greeter_log_level=debug", "-e", "greeter_keep_releases=1",
                    check=False)  # fmt: skip
    out = text(result)
    assert result.returncode != 0, out[-3000:]
    assert switched(result.stdout) == [["greeter-1"], ["greeter-2"]]
    failed = re.search(
        rf"greeter-2: release ({RELEASE}) failed \(Append to the deploy history: .*?\); "
        rf"rolled back to {before[1]}, which serves again; its history could not be written",
        out,
    )
    assert failed, out[-3000:]
    assert f"greeter-1: the run stopped after this host switched to {failed[1]}" in out, out[-3000:]
    assert releases(pair) == before
    assert served_releases(pair) == before
    # Pruned to greeter_keep_releases=1 beside what is protected: the release just activated,
    # the one it replaced (where the revert went) and the previous one (the link the revert put
    # back), which still resolves.
    assert release_dirs(pair, 0) == {failed[1], before[0], previous}
    assert release(pair, 0, "previous") == previous
    pair.ssh(pair.hosts[0], 'test -d "$(readlink -e /opt/greeter/previous)"')


def test_a_fleet_split_by_configuration_fails_the_final_check(pair: LabSession) -> None:
    """Kept for debugging (no revert): greeter-1 on the new configuration, greeter-2 (whose
    history cannot be written) back on the old one: one commit, two releases."""
    before = releases(pair)
    pair.ssh(pair.hosts[1], BREAK_HISTORY)
    try:
        result = deploy(pair, "-e", "greeter_log_level=debug",
                        "-e", "greeter_revert_on_failure=false", check=False)  # fmt: skip
    finally:
        pair.ssh(pair.hosts[1], MEND_HISTORY)
    out = text(result)
    assert result.returncode != 0, out[-3000:]
    new = release(pair, 0)
    assert new != before[0] and new[:40] == before[0][:40]
    assert served_releases(pair) == [new, before[1]]
    assert f"Fleet now: greeter-1 serves {new}, greeter-2 serves {before[1]}." in out, out[-3000:]
    assert "The hosts do not all serve one release" in out, out[-3000:]
    assert "Every host serves" not in out, out[-3000:]


def test_a_host_switched_but_not_restarted_is_restarted_by_the_next_run(pair: LabSession) -> None:
    """A run killed between the switch and the restart: greeter-2's current names the new
    configuration's release (prepared by the runs above), its process still runs the old one."""
    new, old = release(pair, 0), release(pair, 1)
    assert new != old and release_dirs(pair, 1) >= {new, old}
    pair.ssh(pair.hosts[1], f"sudo ln -sfn /opt/greeter/releases/{old} /opt/greeter/previous && "
             f"sudo ln -sfn /opt/greeter/releases/{new} /opt/greeter/current.killed && "
             "sudo mv -T /opt/greeter/current.killed /opt/greeter/current")  # fmt: skip
    assert releases(pair) == [new, new]
    assert served_releases(pair) == [new, old]
    result = deploy(pair, "-e", "greeter_log_level=debug")
    changed = [c["changed"] for c in recap(result.stdout).values()]
    assert changed[0] == 0 and changed[1] > 0, result.stdout  # greeter-2 restarted, and only it
    assert served_releases(pair) == [new, new]
    assert f"Every host serves release {new}." in text(result), text(result)[-3000:]
