#!/usr/bin/python
"""Resolve a tag, branch or commit of a git repository to one commit, once per rollout.

The role runs this once (``run_once``) and hands the answer to every host, so a branch that
moves during a rolling deploy cannot leave the fleet on two commits. Unlike the ``git``
module's ``clone: false`` mode, a name that is neither a branch nor a tag is an error here
rather than being passed on as if it were a commit.
"""

from __future__ import annotations

import re

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.greeter_redact import redact_url

DOCUMENTATION = r"""
---
module: greeter_git_resolve
short_description: Resolve a git tag, branch or full commit id to a commit id
description:
  - A full 40-hex commit id is returned as is without contacting O(repo)
    (a pinned deploy needs no network).
  - Otherwise runs C(git ls-remote) against O(repo) and returns the commit of branch or tag
    O(version), peeling annotated tags.
  - Fails clearly when the name is unknown or names both a branch and a tag.
  - Read-only; safe in check mode.
  - Its messages never show the user-info of O(repo) (a token, often), nor of any URL in git's
    own error output - they show C(***) instead.
options:
  repo:
    description: URL of the repository.
    type: str
    required: true
  version:
    description: Branch, tag, full ref (C(refs/...)) or full commit id.
    type: str
    required: true
  timeout:
    description: Seconds to wait for the remote.
    type: int
    default: 30
author: greeter project
"""

EXAMPLES = r"""
- name: Resolve the version once for the whole fleet
  greeter_git_resolve:
    repo: https://example.com/greeter.git
    version: v1.2.0
  delegate_to: localhost
  run_once: true
  register: resolved
"""

RETURN = r"""
commit:
  description: The 40-hex commit id.
  returned: success
  type: str
ref:
  description: The ref that matched (C(refs/heads/...) or C(refs/tags/...)), null for a commit.
  returned: success
  type: str
"""

COMMIT = re.compile(r"^[0-9a-f]{40}$")


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "repo": {"type": "str", "required": True},
            "version": {"type": "str", "required": True},
            "timeout": {"type": "int", "default": 30},
        },
        supports_check_mode=True,
    )
    repo, version = module.params["repo"], module.params["version"].strip()
    shown = redact_url(repo)  # the URL as messages may show it: no credentials
    if COMMIT.match(version.lower()):
        module.exit_json(changed=False, commit=version.lower(), ref=None)
    git = module.get_bin_path("git", required=True)
    if version.startswith("refs/tags/"):
        head, tag = "", version
    elif version.startswith("refs/"):
        head, tag = version, ""
    else:
        head, tag = f"refs/heads/{version}", f"refs/tags/{version}"
    rc, out, err = module.run_command(
        ["timeout", str(module.params["timeout"]), git, "ls-remote", repo]
        + [pattern for pattern in (head, tag, f"{tag}^{{}}") if pattern and pattern != "^{}"],
        environ_update={"GIT_TERMINAL_PROMPT": "0"},
    )
    if rc != 0:
        reason = redact_url(err.strip()) or f"git exited {rc}"
        module.fail_json(msg=f"cannot list the refs of {shown}: {reason}")
    refs = {
        ref: sha for sha, ref in (line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    }
    if head in refs and tag in refs:
        module.fail_json(
            msg=f"{version!r} is both a branch and a tag in {shown}: name it {tag} or {head}"
        )
    if tag in refs:
        module.exit_json(changed=False, commit=refs.get(f"{tag}^{{}}", refs[tag]), ref=tag)
    if head in refs:
        module.exit_json(changed=False, commit=refs[head], ref=head)
    module.fail_json(
        msg=f"version {version!r} is not a branch or tag of {shown} (nor a full 40-hex commit id)"
    )


if __name__ == "__main__":
    main()
