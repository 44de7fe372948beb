"""The outer watchdog of every command the suites start (lab/watchdog.py, one mechanism for the
demo, the tests and the benchmark): past its time limit a command is stopped with its whole
process group, and Stuck says where it was stuck (for an Ansible run: task, hosts, last lines)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "lab" / "watchdog.py"
_spec = importlib.util.spec_from_file_location("lab_watchdog", _PATH)
_module = importlib.util.module_from_spec(_spec)
sys.modules["lab_watchdog"] = _module
_spec.loader.exec_module(_module)

Stuck = _module.Stuck
Watched = _module.Watched
kill_tree = _module.kill_tree
run = _module.run

__all__ = ["Stuck", "Watched", "kill_tree", "run"]
