"""Day one, as written: the README's real-AWS commands and the GitHub workflows, run verbatim
from fresh clones against a lab standing in for an AWS account.

Only what a real account provides is swapped for the lab's: the emulator's endpoint, and its
credentials behind the README's profile name; the lab's SSH key as the README's key pair and
private-key file; the lab's git server for the fork the README's placeholder URL names (the
hosts reach no GitHub). Everything else runs as the README prints it, in bash, in a `git clone`
of HEAD with nothing prepared: `make venv`, the exports, `ansible-playbook site.yml`. The lab
has the README's host count and the balancer, in the README's region.

The tests run in file order and share the lab, as a new team would: the README's deploy and two
of its day-to-day commands, the README's teardown; then CI takes over with a stack of its own
making: the deploy workflow for a new tag (staging creates the stack; production, the same lab
stack with one host less, scales it in), the probe workflow; and last the IAM policies held
against every AWS call those commands made (the emulator records each request; each caller
signs with an access key id of its own).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support import emulator, watchdog
from support.ansible import recap
from support.aws_calls import AwsCallRecorder, check_policy
from support.lab import REPO, LabSession, lab_command, start_lab
from support.workflows import Contexts, Runner

pytestmark = pytest.mark.lab

LAB_NAME = "dayone"
README = REPO / "README.md"
WORKFLOWS = REPO / ".github" / "workflows"
IAM = REPO / "iam"
# What a user replaces in the README's command before running it; the lab serves the fork.
FORK_PLACEHOLDER = "https://github.com/YOUR-ORG/YOUR-FORK.git"
# Two of the README's day-to-day commands, run by the operator between deploy and teardown.
DAY_TO_DAY = (
    "ansible-playbook playbooks/alarms.yml -e greeter_alarms_email=ops@example.com",
    ".ci/probe",
)
NEW_TAG = "v1.1.0"
RUNNER_LABEL = "greeter-lab-runner"  # the self-hosted runner inside the admin CIDR: this machine
DEPLOY_ROLE = "arn:aws:iam::123456789012:role/greeter-ci-deploy"
STACK_ROLE = "arn:aws:iam::123456789012:role/greeter-cloudformation"
PROBE_ROLE = "arn:aws:iam::123456789012:role/greeter-ci-probe"
# Who calls AWS, told apart in the emulator's recording by the access key id each one signs with.
CALLERS = {
    "operator": "AKIADAYONEOPERATOR01",
    "ci-deploy": "AKIADAYONECIDEPLOY01",
    "probe": "AKIADAYONECIPROBE001",
}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def section(text: str, heading: str) -> str:
    """The lines under `heading` (e.g. "## Real AWS") up to the next heading of its level or
    above."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"README.md has no {heading!r} heading"
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(rf"^#{{1,{level}}} ", lines[i])),
        len(lines),
    )
    return "\n".join(lines[start:end]) + "\n"


def sh_block(text: str, where: str) -> str:
    blocks = re.findall(r"^```sh\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"{where}: expected exactly one ```sh block, found {len(blocks)}"
    return blocks[0]


@dataclass(frozen=True)
class ReadmePath:
    """The README's real-AWS path: its deploy and teardown blocks, and the account-side names
    in them that the lab must provide (region, profile, key pair, host count)."""

    deploy: str
    teardown: str

    @classmethod
    def read(cls) -> ReadmePath:
        real = section(README.read_text(), "## Real AWS")
        return cls(
            deploy=sh_block(section(real, "### Deploy"), "Real AWS / Deploy"),
            teardown=sh_block(section(real, "### Tear down"), "Real AWS / Tear down"),
        )

    def _find(self, pattern: str) -> str:
        match = re.search(pattern, self.deploy)
        assert match, f"the README's deploy block no longer matches {pattern!r}"
        return match[1]

    @property
    def region(self) -> str:
        return self._find(r"export AWS_REGION=(\S+)")

    @property
    def profile(self) -> str:
        return self._find(r"export AWS_PROFILE=(\S+)")

    @property
    def key_name(self) -> str:
        return self._find(r"greeter_stack_key_name=(\S+)")

    @property
    def private_key(self) -> str:
        return self._find(r"--private-key (\S+)")

    @property
    def count(self) -> int:
        return int(self._find(r"greeter_stack_instance_count=(\d+)"))

    @property
    def admin_cidr(self) -> str:
        return self._find(r"greeter_stack_admin_cidr=(\S+)")

    @property
    def version(self) -> str:
        return self._find(r"greeter_version=(\S+)")


@dataclass
class Account:
    """The lab as an AWS account and the machine a person or a runner works on."""

    lab: LabSession
    readme: ReadmePath
    scratch: Path
    inventory: Path  # the lab's addresses for the stack's instances, nothing else

    @property
    def endpoint(self) -> str:
        return self.lab.env["AWS_ENDPOINT_URL"]

    @property
    def recorder(self) -> AwsCallRecorder:
        return AwsCallRecorder(self.endpoint)

    def client(self, service: str) -> Any:
        return emulator.client(self.endpoint, service, self.readme.region)

    def machine_env(self, home: Path) -> dict[str, str]:
        """What the machine itself provides a shell, and no more: a system PATH (no project
        virtualenv), a HOME of its own, the lab's network (emulator endpoint, the lab's
        addresses for the instances, its known host keys) and the machine's package access."""
        keep = (
            "AWS_ENDPOINT_URL",
            "AWS_EC2_METADATA_DISABLED",
            "ANSIBLE_SSH_ARGS",
            "ANSIBLE_HOME",
            "ANSIBLE_SSH_CONTROL_PATH_DIR",
        )
        env = {key: self.lab.env[key] for key in keep}
        passed = {
            key: value
            for key, value in os.environ.items()
            if key.startswith("PIP_") or key.lower() in ("http_proxy", "https_proxy", "no_proxy")
        }
        env.update(passed)
        env.update(
            HOME=str(home),
            PATH=SYSTEM_PATH,
            LANG="C.UTF-8",
            # The machine's own pip cache, as a person's ~/.cache/pip would be.
            PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            ANSIBLE_INVENTORY=f"inventory,{self.inventory}",
        )
        return env

    def fresh_clone(self, name: str) -> Path:
        """A `git clone` of this repository's HEAD: nothing generated, nothing installed."""
        dest = self.scratch / name
        subprocess.run([*GIT, "clone", "--quiet", str(REPO), str(dest)], check=True)
        return dest

    def served(self) -> dict[str, dict]:
        """Each backend's probe row (hostname -> row), called directly from the controller."""
        targets = [f"{host.address}:50051" for host in self.lab.hosts]
        result = self.lab.run("greeter", "probe", *targets, "--json", check=False)
        return {row["hostname"] or row["target"]: row for row in json.loads(result.stdout)}


PROBE_ROW = re.compile(r"^\s*-?\s*(\d+\.\d+\.\d+\.\d+:\d+)\s+(yes|NO)\s+(\S+)(.*)$", re.MULTILINE)


def probe_rows(output: str) -> list[tuple[str, str, str, str]]:
    """The rows of the last probe table in a playbook's output: target, ok, health, the rest."""
    table = output.rsplit("TASK [Show the table]", 1)[-1]
    return [(m[1], m[2], m[3], m[4]) for m in PROBE_ROW.finditer(table)]


def assert_fleet_serving(output: str, count: int, commit: str) -> None:
    rows = probe_rows(output)
    shown = "\n".join("  ".join(r) for r in rows)
    assert len(rows) == count + 1, f"expected the front door and {count} hosts:\n{shown}"
    assert "front-door" in rows[0][3], f"the first row is not the front door:\n{shown}"
    for target, ok, health, rest in rows:
        assert (ok, health) == ("yes", "SERVING"), f"{target} is not serving:\n{shown}"
        assert commit[:12] in rest, f"{target} does not serve {commit[:12]}:\n{shown}"
    for target, _, _, rest in rows[1:]:
        assert " UP" in rest, f"{target} is not UP at the balancer:\n{shown}"
    counters = recap(output)
    assert counters and all(c["failed"] == 0 and c["unreachable"] == 0 for c in counters.values())


@pytest.fixture(scope="module")
def account(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Account]:
    readme = ReadmePath.read()
    lab = start_lab(
        LAB_NAME, readme.count, balancer=True, busy_boot=0, region=readme.region, provision=False
    )
    try:
        # The README names no stack: its hosts are the default stack's, greeter-1, greeter-2, ...
        assert lab.env["GREETER_STACK_NAME"] == "greeter", lab.env["GREETER_STACK_NAME"]
        assert lab.env["AWS_REGION"] == readme.region
        scratch = tmp_path_factory.mktemp("dayone")
        inventory = scratch / "lab-inventory"
        shutil.copytree(lab.state / "inventory" / "host_vars", inventory / "host_vars")
        shutil.copy(lab.state / "inventory" / "hosts.yml", inventory / "hosts.yml")
        found = Account(lab=lab, readme=readme, scratch=scratch, inventory=inventory)
        # The README's key pair: the lab's key, imported under the README's name.
        public = (lab.state / "ssh" / "id_ed25519.pub").read_bytes()
        found.client("ec2").import_key_pair(KeyName=readme.key_name, PublicKeyMaterial=public)
        # The user's fork: the lab's git mirror, with the README's version tagged on its main.
        subprocess.run(
            [*GIT, "-C", str(lab.git_mirror), "tag", readme.version, lab.commit], check=True
        )
        found.recorder.reset()
        found.recorder.start()
        yield found
    finally:
        lab_command(LAB_NAME, "down")


@pytest.fixture(scope="module")
def recorded() -> dict[str, object]:
    """What the tests hand on to later ones: the shell the README left, the calls recorded."""
    return {}


def user_home(account: Account) -> Path:
    """A person's HOME: the key pair's private key where the README says, an AWS profile of
    the README's name holding the operator's credentials (the emulator's, under the operator's
    access key id), and nothing else."""
    readme = account.readme
    home = account.scratch / "home"
    key = Path(readme.private_key.replace("~", str(home), 1))
    key.parent.mkdir(parents=True, mode=0o700)
    shutil.copy(account.lab.state / "ssh" / "id_ed25519", key)
    key.chmod(0o600)
    aws = home / ".aws"
    aws.mkdir()
    (aws / "config").write_text(f"[profile {readme.profile}]\nregion = {readme.region}\n")
    (aws / "credentials").write_text(
        f"[{readme.profile}]\naws_access_key_id = {CALLERS['operator']}\n"
        "aws_secret_access_key = operator-secret\n"
    )
    return home


def run_in_readme_shell(
    account: Account, recorded: dict[str, object], script: str, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`script` in bash, in the README's clone, in the shell the README's deploy block left
    (its exports), saving that shell again afterwards."""
    shell = recorded.get("shell")
    assert isinstance(shell, Path), "the README's deploy block did not run"
    env = dict(line.split("=", 1) for line in shell.read_text().split("\0") if "=" in line)
    result = watchdog.run(
        [*BASH, f"{script}\nenv -0 > {shlex.quote(str(shell))}"],
        timeout,
        cwd=recorded["readme-clone"],
        env=env,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-8000:]
    return result


BASH = ["bash", "--noprofile", "--norc", "-e", "-c"]


def test_the_readme_real_aws_path_deploys_a_fleet_from_a_fresh_clone(
    account: Account, recorded: dict[str, object]
) -> None:
    readme = account.readme
    clone = account.fresh_clone("readme")
    assert not list((clone / "service" / "src" / "greeter").glob("*_pb2.py"))
    assert FORK_PLACEHOLDER in readme.deploy, "the README's fork placeholder changed"
    script = readme.deploy.replace(
        FORK_PLACEHOLDER, f"git://{account.lab.bridge_address}/greeter.git"
    )
    shell = account.scratch / "readme-shell.env"
    result = watchdog.run(
        [*BASH, f"{script}\nenv -0 > {shlex.quote(str(shell))}"],
        1800,
        cwd=clone,
        env=account.machine_env(user_home(account)),
    )
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-8000:]
    assert_fleet_serving(result.stdout, readme.count, account.lab.commit)
    recorded["shell"] = shell
    recorded["readme-clone"] = clone
    # The client a user writes: one call through the front door from the clone's own venv.
    balancer = account.lab.balancer
    assert balancer is not None
    hello = subprocess.run(
        [clone / ".venv" / "bin" / "greeter", "hello", f"{balancer.address}:50051", "Teste"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert hello.stdout.strip() == "Olá, Teste!", hello.stdout + hello.stderr


def test_the_readme_deploy_again_changes_nothing(
    account: Account, recorded: dict[str, object]
) -> None:
    """The README: "the same command again changes nothing"."""
    script = account.readme.deploy.replace(
        FORK_PLACEHOLDER, f"git://{account.lab.bridge_address}/greeter.git"
    )
    again = run_in_readme_shell(account, recorded, script)
    assert_fleet_serving(again.stdout, account.readme.count, account.lab.commit)
    changed = {host: c["changed"] for host, c in recap(again.stdout).items()}
    # The emulator reports every stack update as a change (real CloudFormation: "no updates").
    assert changed.pop("localhost") <= 1
    assert changed == dict.fromkeys(changed, 0), changed


def test_the_readme_day_to_day_alarms_and_probe_commands_work_in_that_shell(
    account: Account, recorded: dict[str, object]
) -> None:
    guide = README.read_text()
    for command in DAY_TO_DAY:
        words = command.split(" -e ")[0]
        assert f"`{words}" in guide, f"the README's day-to-day table no longer shows {words!r}"
    alarms = run_in_readme_shell(account, recorded, DAY_TO_DAY[0])
    assert recap(alarms.stdout)["localhost"]["failed"] == 0
    topic = f"arn:aws:sns:{account.readme.region}:123456789012:greeter-events"
    subscriptions = account.client("sns").list_subscriptions_by_topic(TopicArn=topic)
    assert [s["Endpoint"] for s in subscriptions["Subscriptions"]] == ["ops@example.com"]
    probe = run_in_readme_shell(account, recorded, DAY_TO_DAY[1])
    assert_fleet_serving(probe.stdout, account.readme.count, account.lab.commit)
    [point] = healthy_hosts(account)
    assert point["Maximum"] == account.readme.count


def test_the_readme_teardown_removes_the_stack_alarms_and_topic(
    account: Account, recorded: dict[str, object]
) -> None:
    run_in_readme_shell(account, recorded, account.readme.teardown)
    stacks = account.client("cloudformation").list_stacks()["StackSummaries"]
    live = [
        s for s in stacks if s["StackName"] == "greeter" and s["StackStatus"] != "DELETE_COMPLETE"
    ]
    assert not live, live
    alarms = account.client("cloudwatch").describe_alarms(AlarmNamePrefix="greeter/")
    assert not alarms["MetricAlarms"], alarms["MetricAlarms"]
    topics = account.client("sns").list_topics()["Topics"]
    assert not [t for t in topics if t["TopicArn"].endswith(":greeter-events")], topics


def push_tag(account: Account, tag: str) -> str:
    """A new commit on the fork's main, tagged `tag` and pushed (what a release does)."""
    lab = account.lab
    sha = lab.push_commit(account.scratch, f"day one: release {tag}")
    subprocess.run([*GIT, "-C", str(lab.git_mirror), "tag", tag, sha], check=True)
    return sha


def contexts(account: Account, github: dict[str, str]) -> Contexts:
    """The repository's settings, supplied from the lab. One lab stack stands in for both
    environments; production runs one host less, so its deploy also scales the stack in."""
    readme, lab = account.readme, account.lab

    def settings(count: int) -> dict[str, dict[str, str]]:
        return {
            "vars": {
                "AWS_ROLE_ARN": DEPLOY_ROLE,
                "STACK_ROLE_ARN": STACK_ROLE,
                "PROBE_ROLE_ARN": PROBE_ROLE,
                "AWS_REGION": readme.region,
                "GREETER_STACK_NAME": lab.env["GREETER_STACK_NAME"],
                "ADMIN_CIDR": readme.admin_cidr,
                "KEY_NAME": readme.key_name,
                "INSTANCE_COUNT": str(count),
            },
            "secrets": {"SSH_PRIVATE_KEY": (lab.state / "ssh" / "id_ed25519").read_text()},
        }

    return Contexts(
        github={"server_url": f"git://{lab.bridge_address}", "repository": "greeter", **github},
        vars={"RUNNER_LABEL": RUNNER_LABEL},
        environments={
            "staging": settings(readme.count),
            "production": settings(readme.count - 1),
        },
        roles={
            DEPLOY_ROLE: {
                "AWS_ACCESS_KEY_ID": CALLERS["ci-deploy"],
                "AWS_SECRET_ACCESS_KEY": "ci-deploy-secret",
            },
            PROBE_ROLE: {
                "AWS_ACCESS_KEY_ID": CALLERS["probe"],
                "AWS_SECRET_ACCESS_KEY": "ci-probe-secret",
            },
        },
    )


def runner(account: Account, name: str) -> Runner:
    work = account.scratch / f"runner-{name}"
    home = work / "home"
    home.mkdir(parents=True)
    return Runner(
        work=work,
        base_env=account.machine_env(home),
        labels={RUNNER_LABEL},
        clone_source=str(account.lab.git_mirror),
    )


def test_the_deploy_workflow_deploys_a_tag_to_staging_then_production(
    account: Account,
) -> None:
    sha = push_tag(account, NEW_TAG)
    github = {"ref_name": NEW_TAG, "ref": f"refs/tags/{NEW_TAG}", "sha": sha}
    steps = runner(account, "deploy").run_workflow(
        WORKFLOWS / "deploy.yml", contexts(account, github)
    )
    assert [(s.job, s.name) for s in steps] == [
        ("staging", "make venv"),
        ("staging", ".ci/deploy"),
        ("production", "make venv"),
        ("production", ".ci/deploy"),
    ]
    count = account.readme.count
    for step, hosts in ((steps[1], count), (steps[3], count - 1)):
        out = step.result.stdout
        assert f".ci/deploy: {NEW_TAG} ({sha}) to stack greeter" in out
        assert_fleet_serving(out, hosts, sha)
    served = account.served()
    assert {row["commit"] for name, row in served.items() if name != f"greeter-{count}"} == {sha}


def healthy_hosts(account: Account) -> list[dict]:
    now = datetime.now(timezone.utc)
    return (
        account.client("cloudwatch")
        .get_metric_statistics(
            Namespace="Greeter",
            MetricName="HealthyHosts",
            Dimensions=[{"Name": "Stack", "Value": account.lab.env["GREETER_STACK_NAME"]}],
            StartTime=now - timedelta(hours=2),
            EndTime=now + timedelta(minutes=5),
            Period=4 * 3600,
            Statistics=["SampleCount", "Sum", "Maximum"],
        )
        .get("Datapoints", [])
    )


def test_the_probe_workflow_publishes_healthy_hosts(account: Account) -> None:
    [before] = healthy_hosts(account)
    main = subprocess.run(
        ["git", "-C", str(account.lab.git_mirror), "rev-parse", "refs/heads/main"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    github = {"ref_name": "main", "ref": "refs/heads/main", "sha": main}
    steps = runner(account, "probe").run_workflow(
        WORKFLOWS / "probe.yml", contexts(account, github)
    )
    assert [s.name for s in steps] == ["make venv", ".ci/probe"]
    hosts = account.readme.count - 1  # production's
    assert len(probe_rows(steps[-1].result.stdout)) == hosts + 1
    [after] = healthy_hosts(account)
    assert after["SampleCount"] == before["SampleCount"] + 1
    assert after["Sum"] == before["Sum"] + hosts


@pytest.mark.parametrize(
    ("caller", "policy"),
    [
        ("operator", "operator-policy.json"),
        ("ci-deploy", "ci-deploy-policy.json"),
        ("probe", "probe-policy.json"),
    ],
)
def test_each_iam_policy_allows_exactly_what_its_commands_called(
    account: Account, caller: str, policy: str
) -> None:
    called = account.recorder.actions(CALLERS[caller])
    print(f"{caller}: {sorted(called)}")
    assert called, f"no AWS call recorded for {caller}"
    problems = check_policy(IAM / policy, called)
    assert not problems, "\n".join(problems)
