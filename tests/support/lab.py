"""Names of the labs the test suites start."""

from __future__ import annotations

import os


def prefixed(name: str) -> str:
    """A test lab's LAB_NAME: LAB_TEST_PREFIX + name, so two checkouts can run the lab suites at
    once without sharing a bridge or a network namespace name. Under pytest-xdist each worker
    adds its id (gw0-, gw1-, ...): every worker brings up labs of its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return os.environ.get("LAB_TEST_PREFIX", "") + (f"{worker}-" if worker else "") + name
