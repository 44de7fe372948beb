"""The GitHub Actions workflows: actionlint-clean, only the project's own commands, OIDC only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import workflows

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT = str(Path(sys.executable).parent / "actionlint")


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def test_actionlint_passes_the_workflows_and_catches_a_broken_one(tmp_path: Path) -> None:
    clean = subprocess.run([ACTIONLINT], cwd=REPO, capture_output=True, text=True, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    shutil.copytree(REPO / ".github", tmp_path / ".github")
    deploy = tmp_path / ".github" / "workflows" / "deploy.yml"
    deploy.write_text(deploy.read_text().replace("vars.AWS_ROLE_ARN", "var.AWS_ROLE_ARN"))
    broken = subprocess.run(
        [ACTIONLINT, str(deploy)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert broken.returncode == 1
    assert 'undefined variable "var"' in broken.stdout


def test_workflows_run_only_the_projects_own_commands() -> None:
    for name in ("ci.yml", "deploy.yml", "probe.yml"):
        for step in steps(load(name)):
            if "run" in step:
                command = step["run"].strip().removeprefix("sudo --preserve-env=PATH ")
                assert command.startswith(("make ", ".ci/")), (name, step["run"])


def test_deploy_goes_to_staging_then_to_production_after_approval_with_oidc_only() -> None:
    workflow = load("deploy.yml")
    assert workflow[True]["push"]["tags"] == ["v*"]  # YAML 1.1 reads the key `on` as True
    assert workflow["permissions"]["id-token"] == "write"
    jobs = workflow["jobs"]
    assert jobs["staging"]["environment"] == "staging"
    assert jobs["production"]["environment"] == "production"
    assert jobs["production"]["needs"] == "staging"
    for job in jobs.values():
        [credentials] = [s for s in job["steps"] if "aws-credentials" in s.get("uses", "")]
        assert credentials["with"] == {
            "role-to-assume": "${{ vars.AWS_ROLE_ARN }}",
            "aws-region": "${{ vars.AWS_REGION }}",
        }
        [deploy] = [s for s in job["steps"] if s.get("run", "").startswith(".ci/deploy")]
        assert deploy["env"]["SSH_PRIVATE_KEY"] == "${{ secrets.SSH_PRIVATE_KEY }}"
    text = "\n".join((WORKFLOWS / n).read_text() for n in ("ci.yml", "deploy.yml", "probe.yml"))
    assert "aws-access-key-id" not in text
    assert "aws-secret-access-key" not in text


def test_the_probe_workflow_publishes_on_a_schedule() -> None:
    workflow = load("probe.yml")
    assert workflow[True]["schedule"] == [{"cron": "*/5 * * * *"}]
    assert [s["run"] for s in steps(workflow) if "run" in s] == ["make venv", ".ci/probe"]


# The harness that runs the workflows' jobs on the lab (tests/dayone) must refuse what it cannot
# run here, or a workflow step would pass untested.
def harness_job(steps: list[dict]) -> dict:
    return {"jobs": {"only": {"runs-on": "lab", "steps": steps}}}


def harness_runner(tmp_path: Path) -> workflows.Runner:
    return workflows.Runner(
        work=tmp_path, base_env=dict(os.environ), labels={"lab"}, clone_source=str(REPO)
    )


HEAD = subprocess.run(
    ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
).stdout.strip()
GITHUB = workflows.Contexts(github={"ref_name": "main", "sha": HEAD})


@pytest.mark.parametrize(
    ("step", "refusal"),
    [
        ({"uses": "actions/checkout@v5"}, "pinned by commit SHA"),
        ({"uses": f"actions/cache@{'0' * 40}"}, "no local equivalent for action actions/cache"),
        (
            {"uses": f"actions/setup-python@{'0' * 40}", "with": {"python-version": "3.99"}},
            "setup-python asks for 3.99",
        ),
        (
            {"uses": f"actions/checkout@{'0' * 40}", "with": {"submodules": "true"}},
            "inputs ['submodules'] have no local equivalent",
        ),
        ({"run": "true"}, "runs before any checkout"),
    ],
)
def test_the_workflow_harness_refuses_what_it_cannot_run_here(
    tmp_path: Path, step: dict, refusal: str
) -> None:
    with pytest.raises(workflows.Unmapped, match=re.escape(refusal)):
        harness_runner(tmp_path).run_job("only", harness_job([step]), GITHUB)


def test_the_workflow_harness_refuses_a_setting_nobody_supplied() -> None:
    contexts = {"vars": {"SET": "yes"}, "secrets": {}, "github": {}}
    assert workflows.evaluate("${{ vars.SET }}", contexts) == "yes"
    assert workflows.evaluate("${{ vars.UNSET || 'fallback' }}", contexts) == "fallback"
    with pytest.raises(workflows.Unmapped, match=r"vars\.UNSET is not supplied"):
        workflows.evaluate("x ${{ vars.UNSET }}", contexts)
    with pytest.raises(workflows.Unmapped, match=r"secrets\.KEY is not supplied"):
        workflows.evaluate("${{ secrets.KEY }}", contexts)
    with pytest.raises(workflows.Unmapped, match="beyond this harness"):
        workflows.evaluate("${{ format('{0}', vars.SET) }}", contexts)


def test_the_ci_workflow_runs_the_command_that_runs_this_suite(tmp_path: Path) -> None:
    """ci.yml's one command is .ci/run, which runs the README's test command, `make test`: the
    command running this very suite, so it cannot run again inside it. Its actions map to the
    fresh clone and this machine's Python like the other workflows' do."""
    workflow = workflows.load(WORKFLOWS / "ci.yml")
    [job] = workflow["jobs"].values()
    assert [s["run"] for s in job["steps"] if "run" in s] == ["sudo --preserve-env=PATH .ci/run"]
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("\nexec make test")
    runner = workflows.Runner(
        work=tmp_path, base_env=dict(os.environ), labels={job["runs-on"]}, clone_source=str(REPO)
    )
    ctx = GITHUB.for_job(job)
    checkout = None
    for index, step in enumerate(s for s in job["steps"] if "uses" in s):
        checkout = runner.use_action(
            step, ctx, roles={}, env={}, checkout=checkout, slot=str(index)
        )
    assert checkout is not None
    assert (checkout / ".ci" / "run").is_file()


def test_the_deploy_and_probe_jobs_run_only_on_a_self_hosted_runner() -> None:
    """The hosts' SSH is open only to the admin CIDR: the jobs that log in to them run on the
    self-hosted runner RUNNER_LABEL names (inside it), never on GitHub's hosted runners."""
    contexts = {"vars": {}, "secrets": {}, "github": {}}
    for name in ("deploy.yml", "probe.yml"):
        for job in load(name)["jobs"].values():
            assert workflows.evaluate(job["runs-on"], contexts) == "self-hosted"
            label = workflows.evaluate(job["runs-on"], {**contexts, "vars": {"RUNNER_LABEL": "x"}})
            assert label == "x"
