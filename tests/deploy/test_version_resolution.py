"""greeter_version to a commit: the role's greeter_git_resolve module against real git repositories.

The module runs on the controller (preflight.yml: once per run, delegated to localhost), so
running it here, as Ansible runs a module (a JSON file of arguments), against local bare
repositories over file:// is what a deploy does, minus the network. That a branch moving during
a rollout cannot split the fleet is proven on lab hosts in test_deploy.py (the upgrade under load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.git_http import git_over_http, publish

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "roles" / "greeter" / "library" / "greeter_git_resolve.py"
REDACT = REPO / "roles" / "greeter" / "module_utils" / "greeter_redact.py"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


# Ansible ships a module with the role's module_utils it imports as ansible.module_utils.<name>;
# this puts that one in place the same way before running the module as a script.
WITH_MODULE_UTILS = """
import importlib.util, runpy, sys
utils, module, args = sys.argv[1:]
spec = importlib.util.spec_from_file_location("ansible.module_utils.greeter_redact", utils)
sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules[spec.name])
sys.argv = [module, args]
runpy.run_path(module, run_name="__main__")
"""


def resolve(tmp_path: Path, repo: str, version: str) -> dict:
    """Run the module as Ansible does (its arguments in a JSON file) and return its result."""
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {"repo": repo, "version": version}}))
    result = subprocess.run(
        [sys.executable, "-c", WITH_MODULE_UTILS, str(REDACT), str(MODULE), str(args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A bare repository: main, a branch dev, tags of every kind and a name that is both."""
    work = tmp_path_factory.mktemp("work")
    bare = tmp_path_factory.mktemp("origin") / "greeter.git"
    git(work, "init", "--quiet", "--initial-branch=main")
    commits = {}
    for name in ("first", "second", "third"):
        (work / "file").write_text(name)
        git(work, "add", "file")
        git(work, "commit", "--quiet", "-m", name)
        commits[name] = git(work, "rev-parse", "HEAD")
    git(work, "branch", "dev", commits["second"])
    git(work, "reset", "--quiet", "--hard", commits["third"])
    git(work, "tag", "v1.2.0", commits["first"])  # lightweight
    git(work, "tag", "-a", "-m", "release 1.3.0", "v1.3.0", commits["second"])  # annotated
    git(work, "branch", "both", commits["first"])
    git(work, "tag", "both", commits["second"])
    subprocess.run([*GIT, "clone", "--quiet", "--bare", str(work), str(bare)], check=True)
    return {
        "url": f"file://{bare}",
        "path": str(bare),
        **commits,
        "v1.3.0 tag object": git(bare, "rev-parse", "v1.3.0"),
    }


def test_the_roles_default_version_main_resolves_to_the_branch_head(
    origin: dict[str, str], tmp_path: Path
) -> None:
    defaults = yaml.safe_load((REPO / "roles/greeter/defaults/main.yml").read_text())
    assert defaults["greeter_version"] == "main"
    answer = resolve(tmp_path, origin["url"], "main")
    assert (answer.get("commit"), answer.get("ref")) == (origin["third"], "refs/heads/main"), answer


@pytest.mark.parametrize(
    ("version", "commit", "ref"),
    [
        ("dev", "second", "refs/heads/dev"),
        ("v1.2.0", "first", "refs/tags/v1.2.0"),  # a lightweight tag
        ("v1.3.0", "second", "refs/tags/v1.3.0"),  # annotated: the commit, not the tag object
        ("refs/heads/dev", "second", "refs/heads/dev"),
        ("refs/tags/v1.3.0", "second", "refs/tags/v1.3.0"),
        ("refs/heads/both", "first", "refs/heads/both"),  # the way to name an ambiguous one
        ("refs/tags/both", "second", "refs/tags/both"),
    ],
)
def test_branches_and_tags_resolve_to_their_commit(
    origin: dict[str, str], tmp_path: Path, version: str, commit: str, ref: str
) -> None:
    answer = resolve(tmp_path, origin["url"], version)
    assert answer.get("commit") == origin[commit], answer
    assert answer.get("commit") != origin["v1.3.0 tag object"]
    assert answer.get("ref") == ref, answer
    assert not answer.get("changed"), answer


def test_a_name_that_is_both_a_branch_and_a_tag_is_refused_with_both_full_names(
    origin: dict[str, str], tmp_path: Path
) -> None:
    answer = resolve(tmp_path, origin["url"], "both")
    assert answer.get("failed"), answer
    assert "both a branch and a tag" in answer["msg"], answer
    assert "refs/tags/both" in answer["msg"] and "refs/heads/both" in answer["msg"], answer


def test_a_full_commit_id_is_used_as_is_without_asking_the_server(tmp_path: Path) -> None:
    commit = "0123456789ABCDEF0123456789abcdef01234567"
    answer = resolve(tmp_path, f"file://{tmp_path}/no-such-repo.git", commit)
    assert (answer.get("commit"), answer.get("ref")) == (commit.lower(), None), answer


@pytest.mark.parametrize("version", ["v9.9.9", "mai", "refs/heads/nope", "0123456"])
def test_an_unknown_name_is_refused(origin: dict[str, str], tmp_path: Path, version: str) -> None:
    answer = resolve(tmp_path, origin["url"], version)
    assert answer.get("failed"), answer
    assert f"{version!r} is not a branch or tag of {origin['url']}" in answer["msg"], answer


def test_an_unreachable_repository_is_named_in_the_error(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/no-such-repo.git"
    answer = resolve(tmp_path, url, "main")
    assert answer.get("failed"), answer
    assert f"cannot list the refs of {url}" in answer["msg"], answer


def test_a_branch_that_moves_resolves_to_its_new_head(
    origin: dict[str, str], tmp_path: Path
) -> None:
    """No cache between runs: the next run deploys where the branch points then."""
    assert resolve(tmp_path, origin["url"], "dev")["commit"] == origin["second"]
    git(Path(origin["path"]), "update-ref", "refs/heads/dev", origin["third"])
    try:
        assert resolve(tmp_path, origin["url"], "dev")["commit"] == origin["third"]
    finally:
        git(Path(origin["path"]), "update-ref", "refs/heads/dev", origin["second"])


def test_a_url_with_credentials_resolves_and_its_messages_never_show_them(
    origin: dict[str, str], tmp_path: Path
) -> None:
    """A repository behind a password, its token in greeter_repo_url: the module resolves with
    it, and a failure names the repository without the user-info (***)."""
    token = f"tok-{os.urandom(8).hex()}"
    bare = Path(origin["path"])
    publish(bare)
    with git_over_http(bare.parent, "127.0.0.1", "deployer", token) as server:
        url = server.url(bare.name)
        answer = resolve(tmp_path, url, "dev")
        assert answer.get("commit") == origin["second"], answer
        assert server.admitted, "git never sent the credentials"
        unknown = resolve(tmp_path, url, "v9.9.9")
        wrong = resolve(tmp_path, url.replace(token, "wrong-token"), "main")
    shown = f"http://***@127.0.0.1:{server.port}/{bare.name}"
    assert unknown.get("failed") and f"not a branch or tag of {shown}" in unknown["msg"], unknown
    assert wrong.get("failed") and f"cannot list the refs of {shown}" in wrong["msg"], wrong
    for answer in (unknown, wrong):
        assert token not in json.dumps(answer["msg"]) and "deployer" not in answer["msg"], answer
