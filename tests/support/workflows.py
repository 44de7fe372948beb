"""Run a GitHub Actions workflow's jobs on this machine, as a runner would, for the tests.

Each job's `run:` steps run in order in one fresh clone (the checkout), in bash as GitHub runs
them (`bash --noprofile --norc -eo pipefail`), with the `env:` the workflow, job and step set and
every `${{ ... }}` replaced from the contexts the test supplies (vars, secrets, github). Each
`uses:` step becomes its documented local equivalent:

- actions/checkout: a fresh `git clone` of the repository the test names, at the pushed ref;
- actions/setup-python: this machine's python3, which must be the version the step asks for;
- aws-actions/configure-aws-credentials: the credentials the test supplies for the role the step
  names (the emulator's), and the step's region as AWS_REGION and AWS_DEFAULT_REGION.

Anything else — another action, an expression the contexts cannot answer, an input of an action
the mapping does not know — fails the run: the harness never skips a step silently.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from support import watchdog

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
# `a.b`, `a.b || 'literal'`: all the workflows use, and all this harness evaluates.
OPERAND = re.compile(r"^(?:(?P<path>[a-z_]+\.[A-Za-z_][A-Za-z0-9_]*)|'(?P<literal>[^']*)')$")
SHELL = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]


class Unmapped(AssertionError):
    """A workflow asks for something the harness cannot do here."""


@dataclass
class Contexts:
    """What GitHub would hand a run: repository variables, per-environment variables and
    secrets, and the `github` context."""

    github: dict[str, str]
    vars: dict[str, str] = field(default_factory=dict)
    environments: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    # The credentials an assumed role yields: role ARN -> {AWS_ACCESS_KEY_ID: ..., ...}.
    roles: dict[str, dict[str, str]] = field(default_factory=dict)

    def for_job(self, job: dict) -> dict[str, dict[str, str]]:
        environment = self.environments.get(job.get("environment", ""), {})
        if job.get("environment") and job["environment"] not in self.environments:
            raise Unmapped(f"no settings supplied for environment {job['environment']!r}")
        return {
            "github": self.github,
            "vars": {**self.vars, **environment.get("vars", {})},
            "secrets": environment.get("secrets", {}),
        }


def evaluate(text: str, contexts: dict[str, dict[str, str]]) -> str:
    """`text` with each `${{ expression }}` replaced; an unknown name fails (GitHub would give
    an empty string, which is how a missing setting slips through)."""

    def operand(token: str) -> str:
        match = OPERAND.match(token.strip())
        if not match:
            raise Unmapped(f"expression operand {token!r} is beyond this harness")
        if match["literal"] is not None:
            return match["literal"]
        context, _, name = match["path"].partition(".")
        if context not in contexts or name not in contexts[context]:
            raise Unmapped(f"{context}.{name} is not supplied to this run")
        return contexts[context][name]

    def replace(match: re.Match) -> str:
        for alternative in match[1].split("||"):
            try:
                value = operand(alternative)
            except Unmapped:
                if "||" not in match[1]:
                    raise
                # `vars.X || 'default'`: an unset variable falls through to the default.
                if not alternative.strip().startswith("vars."):
                    raise
                continue
            if value:
                return value
        return ""

    return EXPRESSION.sub(replace, text)


def load(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads `on` as True
    return workflow


def job_order(workflow: dict) -> list[str]:
    """The jobs in an order that respects `needs:` (GitHub runs independent jobs at once; one
    after the other is a valid schedule of the same graph)."""
    done: list[str] = []
    jobs = workflow["jobs"]
    while len(done) < len(jobs):
        ready = [
            name
            for name, job in jobs.items()
            if name not in done
            and all(n in done for n in ([job["needs"]] if isinstance(job.get("needs"), str)
                                         else job.get("needs", [])))
        ]  # fmt: skip
        if not ready:
            raise Unmapped(f"the jobs' needs form a cycle: {sorted(set(jobs) - set(done))}")
        done.append(ready[0])
    return done


@dataclass
class StepResult:
    job: str
    name: str
    result: subprocess.CompletedProcess


@dataclass
class Runner:
    """The machine a job runs on: where its checkouts go, the environment every job starts
    with (what the runner's machine provides: PATH, HOME, the lab's network settings), and the
    self-hosted label it answers to."""

    work: Path
    base_env: dict[str, str]
    labels: set[str]
    clone_source: str  # what actions/checkout clones (the repository as the push left it)
    on_step: Callable[[StepResult], None] | None = None

    def run_workflow(self, path: Path, contexts: Contexts) -> list[StepResult]:
        workflow = load(path)
        results: list[StepResult] = []
        for name in job_order(workflow):
            results += self.run_job(name, workflow, contexts)
        return results

    def run_job(self, name: str, workflow: dict, contexts: Contexts) -> list[StepResult]:
        job = workflow["jobs"][name]
        ctx = contexts.for_job(job)
        runs_on = evaluate(str(job["runs-on"]), ctx)
        if runs_on not in self.labels:
            raise Unmapped(f"job {name} runs on {runs_on!r}; this runner is {sorted(self.labels)}")
        timeout = float(job.get("timeout-minutes", 360)) * 60
        env = {**self.base_env, **_env(workflow.get("env"), ctx), **_env(job.get("env"), ctx)}
        env["CI"] = "true"
        checkout: Path | None = None
        results = []
        for index, step in enumerate(job["steps"]):
            label = step.get("name") or step.get("uses") or step["run"].splitlines()[0]
            if "uses" in step:
                checkout = self.use_action(
                    step,
                    ctx,
                    roles=contexts.roles,
                    env=env,
                    checkout=checkout,
                    slot=f"{name}-{index}",
                )
                continue
            if checkout is None:
                raise Unmapped(f"job {name}: step {label!r} runs before any checkout")
            script = evaluate(step["run"], ctx)
            step_env = {**env, **_env(step.get("env"), ctx)}
            result = watchdog.run([*SHELL, "-c", script], timeout, cwd=checkout, env=step_env)
            outcome = StepResult(name, label, result)
            results.append(outcome)
            if self.on_step:
                self.on_step(outcome)
            if result.returncode != 0:
                raise AssertionError(
                    f"job {name}, step {label!r} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout[-8000:]}\n--- stderr\n{result.stderr[-8000:]}"
                )
        return results

    def use_action(
        self,
        step: dict,
        ctx: dict,
        *,
        roles: dict[str, dict[str, str]],
        env: dict[str, str],
        checkout: Path | None,
        slot: str,
    ) -> Path | None:
        action, _, ref = step["uses"].partition("@")
        inputs = {k: evaluate(str(v), ctx) for k, v in (step.get("with") or {}).items()}
        if not re.fullmatch(r"[0-9a-f]{40}", ref):
            raise Unmapped(f"{step['uses']}: third-party actions are pinned by commit SHA")
        if action == "actions/checkout":
            _known(action, inputs, {"fetch-depth"})
            dest = self.work / f"checkout-{slot}"
            if dest.exists():
                shutil.rmtree(dest)
            # The pushed ref, as the event names it: its sha when given, else its name.
            ref = ctx["github"].get("sha") or ctx["github"]["ref_name"]
            subprocess.run(["git", "clone", "--quiet", self.clone_source, str(dest)], check=True)
            subprocess.run(
                ["git", "-C", str(dest), "checkout", "--quiet", "--detach", ref], check=True
            )
            return dest
        if action == "actions/setup-python":
            _known(action, inputs, {"python-version", "cache", "cache-dependency-path"})
            machine = f"{sys.version_info.major}.{sys.version_info.minor}"
            python3 = subprocess.run(
                ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                check=True, capture_output=True, text=True, env=env,
            ).stdout.strip()  # fmt: skip
            if inputs["python-version"] not in (python3, machine):
                raise Unmapped(
                    f"setup-python asks for {inputs['python-version']}; this machine has {python3}"
                )
            if inputs.get("cache") not in (None, "pip"):
                raise Unmapped(f"setup-python cache {inputs['cache']!r}")
            for dependency in inputs.get("cache-dependency-path", "").split():
                if checkout is None or not (checkout / dependency).is_file():
                    raise AssertionError(f"setup-python caches on {dependency}, which is missing")
            return checkout
        if action == "aws-actions/configure-aws-credentials":
            _known(action, inputs, {"role-to-assume", "aws-region"})
            role = inputs["role-to-assume"]
            if role not in roles:
                raise Unmapped(f"no credentials supplied for role {role!r}")
            if not inputs["aws-region"]:
                raise AssertionError("configure-aws-credentials got an empty aws-region")
            env.update(roles[role])
            env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = inputs["aws-region"]
            return checkout
        raise Unmapped(f"no local equivalent for action {action}")


def _known(action: str, inputs: dict, allowed: set[str]) -> None:
    unknown = set(inputs) - allowed
    if unknown:
        raise Unmapped(f"{action}: inputs {sorted(unknown)} have no local equivalent")


def _env(block: dict | None, ctx: dict) -> dict[str, str]:
    return {str(k): evaluate(str(v), ctx) for k, v in (block or {}).items()}
