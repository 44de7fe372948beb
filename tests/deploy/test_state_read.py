"""Both roles' state reads share one library (plugins/module_utils/greeter_host.py, found
through ansible.cfg): run each module as Ansible does, from the repository, on this machine,
and check they read the same files, packages and OS the same way."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, library: str, args: dict, **env: str) -> dict:
    """`ansible localhost -m module` from the repository root (its ansible.cfg), as JSON."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ansible")), "localhost", "-i", "localhost,",
         "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
         "-m", module, "-a", json.dumps(args)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "ANSIBLE_LIBRARY": str(REPO / library),
             "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "json", **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The JSON report, between profile_tasks' lines (a time before, a summary after).
    report, _ = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index("\n{") + 1 :])
    (task,) = report["plays"][0]["tasks"]
    return task["hosts"]["localhost"]


def test_both_state_reads_answer_files_packages_and_os_alike(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("x\n")
    (tmp_path / "a.conf").chmod(0o640)
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("a.conf")
    paths = [str(tmp_path / name) for name in ("a.conf", "dir", "link", "absent")]
    packages = ["dpkg", "no-such-package-here"]
    balancer = run_module(
        "greeter_lb_info", "roles/greeter_lb/library", {"files": paths, "packages": packages}
    )
    # greeter_release_info also imports its role's own module_utils (greeter_boot), which
    # Ansible adds when the role runs: here, named beside the shared one.
    utils = f"{REPO / 'plugins' / 'module_utils'}:{REPO / 'roles' / 'greeter' / 'module_utils'}"
    backend = run_module(
        "greeter_release_info",
        "roles/greeter/library",
        {"root": str(tmp_path / "opt"), "files": paths, "packages": packages},
        ANSIBLE_MODULE_UTILS=utils,
    )
    for answer in (balancer, backend):
        files = answer["files"]
        checksum = hashlib.sha1(b"x\n").hexdigest()  # noqa: S324 -- what Ansible compares
        assert files[paths[0]] == {
            "state": "file", "owner": "root", "group": "root", "mode": "0640", "checksum": checksum
        }  # fmt: skip
        assert [files[p]["state"] for p in paths] == ["file", "directory", "link", "absent"]
        assert answer["missing_packages"] == ["no-such-package-here"]
        assert answer["os"]["id"] == "debian" and answer["os"]["python"]
    assert balancer["files"] == backend["files"]
    assert balancer["os"] == backend["os"]
