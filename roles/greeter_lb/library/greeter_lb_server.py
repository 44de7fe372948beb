#!/usr/bin/python
"""Read or set the state of the balancer's backend servers through HAProxy's runtime API.

The rollout drains a backend before its service restarts and waits until the calls it carries
end, then puts it back after its health gate and waits until HAProxy's own gRPC health check
passes again. The probe reads every server's state. One module for all three, so the socket
protocol lives in one place; it runs on the balancer host, where the socket is (root only).
"""

from __future__ import annotations

import csv
import io
import os
import socket
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
---
module: greeter_lb_server
short_description: Read or set HAProxy backend server states over the runtime API
description:
  - Without O(state), reports every server of O(backend) (RV(servers)); changes nothing.
  - With O(server) and O(state) C(drain), stops new calls to it and waits up to O(timeout)
    seconds until its current sessions are 0 (a warning says when it went on with calls left).
  - With C(ready), returns it to rotation and waits up to O(timeout) seconds until its health
    check passes (UP); fails if it does not.
  - With C(maint), takes it out of rotation and out of health checks at once.
  - A missing socket (no balancer running yet) or a server the backend does not list is reported,
    not an error, so a first deploy can run before the balancer exists.
options:
  socket:
    description: Path of the runtime API socket (C(stats socket ... level admin)).
    type: path
    default: /run/haproxy/admin.sock
  backend:
    description: HAProxy backend holding the servers.
    type: str
    default: greeter
  server:
    description: Server name (the backend host's inventory name).
    type: str
  state:
    description: Wanted state of O(server); omit to only read.
    type: str
    choices: [drain, ready, maint]
  timeout:
    description: Seconds to wait for the sessions to end (drain) or the check to pass (ready).
    type: float
    default: 30
author: greeter project
"""

RETURN = r"""
present:
  description: Whether the runtime API socket exists (a balancer runs on this host).
  returned: always
  type: bool
found:
  description: Whether O(backend) lists O(server).
  returned: always
  type: bool
servers:
  description: Every server of O(backend) after the change, by name, with C(state) (UP, DOWN,
    DRAIN or MAINT), C(status) (HAProxy's own words), C(sessions) (current), C(total) (sessions
    since start), C(check) (last check status) and C(address).
  returned: always
  type: dict
waited:
  description: Seconds spent waiting.
  returned: always
  type: float
"""

POLL = 0.2


def command(path: str, line: str) -> str:
    """One runtime API command: HAProxy answers and closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def state_of(status: str) -> str:
    """UP, DOWN, DRAIN or MAINT from `show stat`'s status ("UP 1/2", "MAINT (via x)", ...)."""
    word = status.split(" ", maxsplit=1)[0].upper()
    if word == "MAINT" or word.startswith("MAINT"):
        return "MAINT"
    if word in ("DRAIN", "NOLB"):
        return "DRAIN"
    if word in ("UP", "NO"):  # "no check": in rotation without checks
        return "UP"
    return "DOWN"


def servers(path: str, backend: str) -> dict[str, dict]:
    text = command(path, "show stat").lstrip("# ")
    found = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        found[row["svname"]] = {
            "state": state_of(row["status"]),
            "status": row["status"],
            "sessions": int(row["scur"] or 0),
            "total": int(row["stot"] or 0),
            "check": row.get("check_status", ""),
            "address": row.get("addr", ""),
        }
    return found


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "socket": {"type": "path", "default": "/run/haproxy/admin.sock"},
            "backend": {"type": "str", "default": "greeter"},
            "server": {"type": "str"},
            "state": {"type": "str", "choices": ["drain", "ready", "maint"]},
            "timeout": {"type": "float", "default": 30},
        },
        required_by={"state": "server"},
        supports_check_mode=True,
    )
    path, backend = module.params["socket"], module.params["backend"]
    name, wanted = module.params["server"], module.params["state"]
    if not os.path.exists(path):
        module.exit_json(changed=False, present=False, found=False, servers={}, waited=0.0)
    before = servers(path, backend)
    if not wanted or name not in before:
        module.exit_json(
            changed=False, present=True, found=name in before, servers=before, waited=0.0
        )
    state = before[name]["state"]
    changed = {
        "drain": state != "DRAIN",
        "maint": state != "MAINT",
        "ready": state in ("DRAIN", "MAINT"),
    }[wanted]
    if module.check_mode:
        module.exit_json(changed=changed, present=True, found=True, servers=before, waited=0.0)
    answer = command(path, f"set server {backend}/{name} state {wanted}").strip()
    if answer:
        module.fail_json(
            msg=f"HAProxy refused `set server {backend}/{name} state {wanted}`: {answer}"
        )
    started = time.monotonic()
    deadline = started + module.params["timeout"]
    now = servers(path, backend)
    while wanted != "maint" and time.monotonic() < deadline:
        if wanted == "drain" and now[name]["sessions"] == 0:
            break
        if wanted == "ready" and now[name]["state"] == "UP":
            break
        time.sleep(POLL)
        now = servers(path, backend)
    waited = round(time.monotonic() - started, 2)
    result = {"changed": changed, "present": True, "found": True, "servers": now, "waited": waited}
    if wanted == "drain" and now[name]["sessions"]:
        module.warn(
            f"{name} still carried {now[name]['sessions']} call(s) at the balancer after "
            f"{module.params['timeout']:g} s of draining; went on (they may fail)."
        )
    if wanted == "ready" and now[name]["state"] != "UP":
        module.fail_json(
            msg=f"{name} is back in rotation but the balancer's health check still says "
            f"{now[name]['status']} ({now[name]['check']}) after {module.params['timeout']:g} s: "
            "can the balancer reach its gRPC port?",
            **result,
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
