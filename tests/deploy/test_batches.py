"""The rollout's default batches (greeter_serial) against fleets of 1 to 200 hosts: the role's own
greeter_batches filter with the role's own default, as rollout.yml calls it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROLE = Path(__file__).resolve().parents[2] / "roles" / "greeter"


def load_filter():
    spec = importlib.util.spec_from_file_location(
        "greeter_filters", ROLE / "filter_plugins" / "greeter.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.greeter_batches


greeter_batches = load_filter()
DEFAULT = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())["greeter_serial"]


def sizes(count: int, serial: object = DEFAULT) -> list[int]:
    hosts = [f"greeter-{n:03d}" for n in range(1, count + 1)]
    batches = greeter_batches(hosts, serial)
    assert [h for batch in batches for h in batch] == hosts  # every host once, in order
    return [len(batch) for batch in batches]


def test_the_argument_spec_states_the_same_default() -> None:
    spec = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    assert spec["argument_specs"]["main"]["options"]["greeter_serial"]["default"] == DEFAULT


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (1, [1]),
        (3, [1, 1, 1]),
        (4, [1, 1, 1, 1]),
        (12, [1, 1, 3, 3, 3, 1]),
        (50, [1, 5, 12, 12, 12, 8]),
        (100, [1, 10, 25, 25, 25, 14]),
    ],
)
def test_one_host_first_then_a_tenth_then_a_quarter_at_a_time(
    count: int, expected: list[int]
) -> None:
    assert sizes(count) == expected


def test_no_default_batch_takes_more_than_a_quarter_of_the_fleet_out() -> None:
    for count in range(1, 201):
        assert sizes(count)[0] == 1, count  # the canary is one host
        assert max(sizes(count)) <= max(1, count // 4), (count, sizes(count))


def test_a_count_a_percentage_and_a_list_split_as_ansibles_serial_does() -> None:
    assert sizes(5, 2) == [2, 2, 1]
    assert sizes(5, "50%") == [2, 2, 1]  # 2.5 rounds down, like Ansible
    assert sizes(3, "10%") == [1, 1, 1]  # never an empty batch
    assert sizes(7, [1, 2, "100%"]) == [1, 2, 4]
