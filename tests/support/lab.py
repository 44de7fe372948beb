"""Names of the labs the test suites start."""

from __future__ import annotations

import os


def prefixed(name: str) -> str:
    """A test lab's LAB_NAME: LAB_TEST_PREFIX + name, so two checkouts can run the lab suites at
    once without sharing a bridge or a network namespace name."""
    return os.environ.get("LAB_TEST_PREFIX", "") + name
