#!/usr/bin/python
"""Read or set the state of the balancer's backend servers through HAProxy's runtime API.

The rollout drains a backend before its service restarts and waits until the calls it carries
end, then puts it back after its health gate and waits until HAProxy's own gRPC health check
passes again. The probe reads every server's state. One module for all three, so the socket
protocol lives in one place; it runs on the balancer host, where the socket is (root only).
Around a reload it also saves the servers' states for the new process (HAProxy's
server-state-file), so a reload does not put a drained backend back into rotation.
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
  - With O(states_file) and O(states) C(save), writes every server's runtime state (C(show
    servers state)) there for the next process's C(load-server-state-from-file), and returns the
    answering process's RV(pid). With C(loaded) and O(pid), waits up to O(timeout) seconds until
    another process answers (the reloaded one, which read the file at its start), then removes
    the file, so a later reload or restart that did not save it first cannot load stale states.
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
    description: Seconds to wait for the sessions to end (drain), the check to pass (ready) or
      the reloaded process to answer (O(states)=C(loaded)).
    type: float
    default: 30
  states_file:
    description: Server state file of HAProxy's C(server-state-file).
    type: path
  states:
    description: Save the servers' states before a reload, or drop them once it is done.
    type: str
    choices: [save, loaded]
  pid:
    description: With O(states)=C(loaded), the process that answered before the reload.
    type: int
  config:
    description: The configuration the new process loads; with O(states)=C(save), only the
      servers whose address and port it keeps are saved (HAProxy would apply a saved port over
      a changed one, haproxy/haproxy#1412).
    type: path
    default: /etc/haproxy/haproxy.cfg
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
pid:
  description: The process answering the runtime API (O(states) only).
  returned: with O(states)
  type: int
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


def pid_of(path: str) -> int:
    for line in command(path, "show info").splitlines():
        if line.startswith("Pid:"):
            return int(line.split(":", 1)[1])
    return 0


def wanted_servers(path: str, backend: str) -> dict[str, str]:
    """name -> "address:port" of each server of `backend` in the configuration about to load."""
    wanted, inside = {}, False
    with open(path) as config:
        for line in config:
            words = line.split()
            if words[:1] in (["backend"], ["frontend"], ["listen"], ["defaults"], ["global"]):
                inside = words[:2] == ["backend", backend]
            elif inside and words[:1] == ["server"] and len(words) >= 3:
                wanted[words[1]] = words[2]
    return wanted


def keep_matching(text: str, wanted: dict[str, str]) -> str:
    """The state lines of the servers whose address and port are still the configuration's.

    HAProxy applies a saved server's port (and address) over the new configuration's
    (haproxy/haproxy#1412): a server whose port changed would keep the old one. Such a server
    starts afresh instead, as without a state file."""
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith("# ")), "")
    names = header[2:].split()
    kept = [line for line in lines if not line.strip() or not line[0].isdigit() or line == "1"]
    for line in lines:
        fields = dict(zip(names, line.split(), strict=False))
        if line == "1" or "srv_name" not in fields:
            continue
        where = f"{fields['srv_addr']}:{fields.get('srv_port', '')}"
        if wanted.get(fields["srv_name"]) == where:
            kept.append(line)
    return "\n".join(kept) + "\n"


def handle_states(module: AnsibleModule, path: str, backend: str) -> None:
    """Save the states before a reload, or remove the saved file once the new process runs."""
    target, pid = module.params["states_file"], module.params["pid"]
    if module.params["states"] == "save":
        text = keep_matching(
            command(path, f"show servers state {backend}"),
            wanted_servers(module.params["config"], backend),
        )
        if not module.check_mode:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
        module.exit_json(changed=False, present=True, pid=pid_of(path), waited=0.0)
    started = time.monotonic()
    deadline = started + module.params["timeout"]
    now = pid
    while now == pid and time.monotonic() < deadline:
        time.sleep(POLL)
        try:  # the socket is replaced while the new process starts
            now = pid_of(path)
        except OSError:
            now = pid
    if now == pid:
        module.fail_json(
            msg=f"HAProxy did not reload within {module.params['timeout']:g} s (process {pid} "
            f"still answers); {target} is kept for it."
        )
    if os.path.exists(target) and not module.check_mode:
        os.unlink(target)
    module.exit_json(
        changed=False, present=True, pid=now, waited=round(time.monotonic() - started, 2)
    )


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "socket": {"type": "path", "default": "/run/haproxy/admin.sock"},
            "backend": {"type": "str", "default": "greeter"},
            "server": {"type": "str"},
            "state": {"type": "str", "choices": ["drain", "ready", "maint"]},
            "timeout": {"type": "float", "default": 30},
            "states_file": {"type": "path"},
            "states": {"type": "str", "choices": ["save", "loaded"]},
            "pid": {"type": "int"},
            "config": {"type": "path", "default": "/etc/haproxy/haproxy.cfg"},
        },
        required_by={"state": "server", "states": "states_file"},
        required_if=[("states", "loaded", ["pid"])],
        mutually_exclusive=[("state", "states")],
        supports_check_mode=True,
    )
    path, backend = module.params["socket"], module.params["backend"]
    name, wanted = module.params["server"], module.params["state"]
    if not os.path.exists(path):
        module.exit_json(changed=False, present=False, found=False, servers={}, waited=0.0)
    if module.params["states"]:
        handle_states(module, path, backend)
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
