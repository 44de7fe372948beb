"""Secrets: none in the repository, every task that writes key material hides it, and the
role never shows or stores repository credentials nor a plain hash of the configuration.

Static checks over what git tracks (so they hold in a fresh clone): no private key or cloud
credential is committed, the lab's throwaway CA lands in an ignored folder, the tasks that
install private keys run with `no_log`, and no default or example opens SSH to the world.
Then the role's own safeguards, in plain Python (its filter plugin imported as Ansible loads
it): greeter_repo_url's user-info redacted wherever the role shows or stores the URL, the deploy
history and build marker root's to read, and release ids keyed with the fleet's release key.
test_lab_hardening.py proves the same on a lab host, end to end.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SELF = Path(__file__).resolve()

PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?([A-Za-z0-9/+]{40})\b", re.I)
WORLD = "0.0.0.0/0"
# Access key ids made up for the AWS emulator only: tests/dayone tells its callers apart by them.
EMULATOR_KEY_IDS = {"AKIADAYONEOPERATOR01", "AKIADAYONECIDEPLOY01", "AKIADAYONECIPROBE001"}


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
            if {match[0] for match in pattern.finditer(text)} - EMULATOR_KEY_IDS:
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


# ---- the role's safeguards ---------------------------------------------------------------------

ROLE = REPO / "roles" / "greeter"


def load_filters():
    """The role's filter plugin, imported from its file as Ansible does (a module of its own)."""
    spec = importlib.util.spec_from_file_location(
        "greeter_role_filters", ROLE / "filter_plugins" / "greeter.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that worker processes find its functions by name
    spec.loader.exec_module(module)
    return module


filters = load_filters()


@pytest.mark.parametrize(
    ("shown", "redacted"),
    [
        ("https://deployer:tok3n@git.example.com/greeter.git",
         "https://***@git.example.com/greeter.git"),
        ("https://tok3n@github.com/example/greeter.git",  # a token as the user name
         "https://***@github.com/example/greeter.git"),
        ("https://oauth2:p@ss@w0rd@gitlab.example.com:8443/x.git",  # a raw @ in the password
         "https://***@gitlab.example.com:8443/x.git"),
        ("ssh://git:tok3n@host/x.git", "ssh://***@host/x.git"),
        ("http://u:tok3n@host", "http://***@host"),
        ("fatal: unable to access 'https://u:tok3n@h.example/x.git/': Could not resolve host",
         "fatal: unable to access 'https://***@h.example/x.git/': Could not resolve host"),
        ("from https://a:tok3n@one/x and https://b:tok3n@two/y",
         "from https://***@one/x and https://***@two/y"),
    ],
)  # fmt: skip
def test_redact_url_hides_the_user_info_of_every_url(shown: str, redacted: str) -> None:
    assert filters.greeter_redact_url(shown) == redacted
    assert filters.greeter_redact_url([shown, shown]) == [redacted, redacted]


@pytest.mark.parametrize(
    "text",
    [
        "git://10.1.0.1/greeter.git",
        "https://github.com/example/greeter.git",
        "git@github.com:example/greeter.git",  # scp-like: an SSH user, not a secret
        "https://host/path/with@sign",  # an @ after the authority is not user-info
        "mail ops@example.com about it",
        "",
    ],
)
def test_redact_url_leaves_text_without_credentials_alone(text: str) -> None:
    assert filters.greeter_redact_url(text) == text


CONFIG = {
    "greeter.env": {"state": "file", "owner": "root", "group": "greeter", "mode": "0640",
                    "checksum": hashlib.sha1(b"API_TOKEN=hunter2\n").hexdigest()},  # noqa: S324
    "greeter.service": {"state": "file", "owner": "root", "group": "root", "mode": "0644",
                        "checksum": "0" * 40},
}  # fmt: skip


def test_the_config_digest_is_keyed_stable_and_no_plain_hash(tmp_path: Path) -> None:
    key_file = tmp_path / "controller" / "config" / "greeter" / "fleet.release-key"
    digest = filters.greeter_config_digest(CONFIG, str(key_file))
    # made on first use, root's (the controller user's) alone
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert len(key_file.read_text().strip()) == 64
    # the same configuration and key: the same release id, run after run
    assert filters.greeter_config_digest(dict(reversed(CONFIG.items())), str(key_file)) == digest
    # another configuration, or another fleet's key: another digest
    changed = {**CONFIG, "greeter.service": {**CONFIG["greeter.service"], "checksum": "1" * 40}}
    assert filters.greeter_config_digest(changed, str(key_file)) != digest
    assert filters.greeter_config_digest(CONFIG, str(tmp_path / "other.key")) != digest
    # no hash anyone can compute from a guess of the configuration, as the role's was
    for text in (json.dumps(CONFIG, sort_keys=True),
                 json.dumps(CONFIG, sort_keys=True, separators=(",", ":"))):  # fmt: skip
        for plain in (hashlib.sha1, hashlib.sha256):
            assert plain(text.encode()).hexdigest()[:12] != digest[:12]
    assert hashlib.sha256(b"hunter2").hexdigest()[:12] not in digest


def digest_in_a_process(key_file: str) -> str:
    return filters.greeter_config_digest(CONFIG, key_file)


def test_runs_that_start_together_make_one_release_key(tmp_path: Path) -> None:
    """Deploys of several labs (or fleets) start at once: the first key written wins, and every
    run names the release with it."""
    key_file = str(tmp_path / "greeter" / "fleet.release-key")
    with ProcessPoolExecutor(8, mp_context=get_context("fork")) as pool:
        digests = set(pool.map(digest_in_a_process, [key_file] * 16))
    assert len(digests) == 1, digests
    assert digests == {filters.greeter_config_digest(CONFIG, key_file)}
    assert sorted(p.name for p in (tmp_path / "greeter").iterdir()) == ["fleet.release-key"]


@pytest.mark.parametrize(("mode", "content"), [(0o644, "k" * 64), (0o600, "short")])
def test_a_release_key_others_can_read_or_too_short_is_refused(
    tmp_path: Path, mode: int, content: str
) -> None:
    key_file = tmp_path / "fleet.release-key"
    key_file.write_text(content)
    key_file.chmod(mode)
    with pytest.raises(filters.AnsibleFilterError) as refused:
        filters.greeter_release_key_ready(str(key_file))
    assert "greeter_release_key_file" in str(refused.value)
    assert str(key_file) in str(refused.value)
    assert str(refused.value).endswith("Nothing was changed.")


def role_tasks() -> Iterator[tuple[str, dict]]:
    """(file name, task) of every task of the role, at any depth."""
    for path in sorted((ROLE / "tasks").glob("*.yml")):
        for task in mappings_in(yaml.safe_load(path.read_text())):
            if "name" in task:
                yield path.name, task


def strings_in(node: object, key: str = "") -> Iterator[tuple[str, str]]:
    """(key, text) of every string in a task, with the key it sits under."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from strings_in(value, str(name))
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item, key)
    elif isinstance(node, str):
        yield key, node


def test_the_role_shows_and_stores_greeter_repo_url_only_redacted() -> None:
    """Only git itself gets the URL as it is (a module's `repo`); any message, file content or
    command argument gets it through greeter_redact_url."""
    raw, redacted = [], []
    for name, task in role_tasks():
        for key, text in strings_in({k: v for k, v in task.items() if k != "block"}):
            for use in re.findall(r"\{\{((?:(?!\}\}).)*greeter_repo_url.*?)\}\}", text, re.S):
                if key == "repo":
                    continue
                where = f"{name}: {task['name']}: {key}"
                (redacted if "greeter_redact_url" in use else raw).append(where)
    assert raw == [], "the URL is shown or stored with its credentials"
    assert redacted, "no task shows the URL: the check found nothing to check"
    failures = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert "greeter_redact_url" in failures["_greeter_failed_msg"]
    assert "greeter_redact_url" in failures["_greeter_failed_how"]


def test_the_build_marker_and_the_history_are_root_s_to_read() -> None:
    tasks = {task["name"]: task for _, task in role_tasks()}
    marker = tasks["Mark the build complete"]["ansible.builtin.copy"]
    assert marker["mode"] in ("0600", "0640") and marker["group"] == "root", marker
    assert "greeter_redact_url" in marker["content"], marker
    checkout = tasks["Create the checkout directory, root's alone"]["ansible.builtin.file"]
    assert checkout["mode"] == "0700", checkout
    wanted = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["_greeter_history_wanted"]
    assert wanted == {"state": "file", "owner": "root", "group": "root", "mode": "0640"}
    history = tasks["Append to the deploy history"]["ansible.builtin.lineinfile"]
    assert history["mode"] == "{{ _greeter_history_wanted.mode }}", history
    assert "Keep the deploy history private" in tasks  # an existing file is fixed too


def test_values_read_from_the_account_pass_only_through_no_log_tasks() -> None:
    """greeter_extra_env_from's values live in _greeter_env_from: every task that sets or writes
    it is no_log, and the lookups take their endpoint from the standard AWS environment only."""
    touching = []
    for name, task in role_tasks():
        text = json.dumps({k: v for k, v in task.items() if k != "block"})
        sets = "_greeter_env_from" in json.dumps(task.get("ansible.builtin.set_fact", {}))
        if sets or ("greeter.env.j2" in text and "ansible.builtin.template" in task):
            touching.append(f"{name}: {task['name']}")
            if task.get("ansible.builtin.set_fact") == {"_greeter_env_from": {}}:
                continue  # the empty start holds nothing
            assert task.get("no_log") is True, f"{touching[-1]} may show a value"
    assert len(touching) == 3, touching  # the start, the read, the env file's write
    [read] = [t for _, t in role_tasks() if "amazon.aws.ssm_parameter" in json.dumps(t)]
    assert "amazon.aws.secretsmanager_secret" in json.dumps(read)
    assert "endpoint" not in json.dumps(read)
    template = (ROLE / "templates" / "greeter.env.j2").read_text()
    assert "_greeter_env_from" in template and "replace('$', '\\\\$')" in template
