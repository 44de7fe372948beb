"""Rollout safety on 2 lab hosts: a release is (commit, configuration), the bake window, rescue.

One lab (``ro-cfg``) shared by these tests in file order, each starting from the fleet the
previous one left. Each fails on the role before issue 11.
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
