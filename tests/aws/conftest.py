"""Fixtures for the stack tests: one moto server on loopback per session (see aws_helpers.py)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from aws_helpers import Aws, start_emulator, stop_emulator

_stack_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aws]:
    """One emulator for the session; stopping it cleanly (exit 0) is part of the contract."""
    ready_file = tmp_path_factory.mktemp("emulator") / "ready"
    process, endpoint = start_emulator(ready_file)
    try:
        yield Aws(endpoint)
    finally:
        returncode = stop_emulator(process)
    assert returncode == 0, process.stdout.read()
    assert not ready_file.exists(), "the emulator leaves no stale ready file behind"


@pytest.fixture
def stack() -> str:
    """A stack name no other test uses (also the prefix of its instance names)."""
    return f"test{next(_stack_numbers)}"
