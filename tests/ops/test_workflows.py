"""The GitHub Actions workflows: actionlint-clean, only the project's own commands, OIDC only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

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
