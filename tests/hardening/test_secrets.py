"""Secrets: none in the repository, and every task that writes key material hides it.

Static checks over what git tracks (so they hold in a fresh clone): no private key or cloud
credential is committed, the lab's throwaway CA lands in an ignored folder, the tasks that
install private keys run with `no_log`, and no default or example opens SSH to the world.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SELF = Path(__file__).resolve()

PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?([A-Za-z0-9/+]{40})\b", re.I)
WORLD = "0.0.0.0/0"


def tracked_files() -> list[Path]:
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    return [REPO / name.decode() for name in names if name and (REPO / name.decode()).is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    return None if b"\0" in data[:4096] else data.decode(errors="replace")


def test_no_private_key_or_cloud_credential_is_committed() -> None:
    found = []
    for path in tracked_files():
        text = text_of(path)
        if text is None or path == SELF:
            continue
        for pattern in (PRIVATE_KEY, AWS_ACCESS_KEY_ID, AWS_SECRET):
            if pattern.search(text):
                found.append(f"{path.relative_to(REPO)}: {pattern.pattern}")
    assert found == []


def test_the_lab_ca_and_keys_land_in_an_ignored_folder() -> None:
    for path in (".lab/demo/tls/ca.key", ".lab/test/tls/server.key", ".lab/demo/ssh/id_ed25519"):
        ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], check=False)
        assert ignored.returncode == 0, f"{path} would not be ignored by git"


def mappings_in(node: object) -> Iterator[dict]:
    """Every mapping in a YAML document: tasks at any depth (blocks, rescues, handlers)."""
    if isinstance(node, list):
        for item in node:
            yield from mappings_in(item)
    elif isinstance(node, dict):
        yield node
        for value in node.values():
            yield from mappings_in(value)


KEY_SOURCES = re.compile(r"(_key_src\b|\.key\b|\bkeys?\b)", re.I)
WRITERS = ("copy", "template", "ansible.builtin.copy", "ansible.builtin.template")


def test_tasks_that_install_private_keys_use_no_log() -> None:
    files = [
        p for p in tracked_files()
        if p.suffix == ".yml" and p.parts[len(REPO.parts)] in ("roles", "playbooks")
    ]  # fmt: skip
    assert files, "no role or playbook files found"
    writers = []
    for path in files:
        for task in mappings_in(yaml.safe_load(path.read_text())):
            module = next((m for m in WRITERS if m in task), None)
            if module is None:
                continue
            args = f"{task.get('name', '')} {task[module]} {task.get('loop', '')}"
            if KEY_SOURCES.search(args):
                writers.append(f"{path.relative_to(REPO)}: {task.get('name')}")
                assert task.get("no_log") is True, (
                    f"{writers[-1]} writes key material without no_log"
                )
    assert writers, "no task installs a private key: the TLS option is missing?"


def test_no_default_or_example_opens_ssh_to_the_world() -> None:
    offenders = []
    for path in tracked_files():
        text = text_of(path)
        if text is None or path == SELF or path.parts[len(REPO.parts)] == "tests":
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if WORLD in line and re.search(r"ssh|admin|\b22\b", line, re.I):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
