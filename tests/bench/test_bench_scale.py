"""The scale table's harness (bench/scale.py), without a lab: rows, ratios, targets, arguments."""

import pytest

from bench import scale


def step(seconds: float, changed: int = 0, lost: int | None = None) -> scale.Step:
    calls = None if lost is None else 1000
    return scale.Step(seconds, load=3.0, changed=changed, calls_ok=calls, calls_lost=lost)


def fleet(first: float, noop: float, upgrade: float, rollback: float, lost: int = 0) -> dict:
    return {
        "first": step(first, changed=40),
        "noop": step(noop),
        "upgrade": step(upgrade, changed=9, lost=lost),
        "rollback": step(rollback, changed=9, lost=0),
    }


def test_each_row_has_its_time_and_the_ratio_to_the_smallest_fleet():
    text = scale.table({5: fleet(100, 4, 40, 40), 50: fleet(400, 10, 160, 120, lost=2)})
    lines = text.splitlines()
    assert lines[0].startswith("| step | hosts | seconds | vs 5 hosts |")
    assert "| no-op rerun (deploy.yml) | 50 | 10.0 | 2.50x | 0 |" in text
    assert "| config-only upgrade | 50 | 160.0 | 4.00x | 9 | 1000 ok, 2 lost | 3.0 |" in text
    assert "| first deploy (site.yml) | 5 | 100.0 | 1.00x |" in text
    assert len(lines) == 2 + 4 * 2  # header, rule, four steps at two sizes


def test_the_targets_of_issue_23_are_checked_and_missing_sizes_are_misses():
    met = {
        t.name: t.ok
        for t in scale.targets({5: fleet(100, 4, 40, 40), 50: fleet(500, 11, 160, 120)})
    }
    assert met == {
        "no-op rerun of 50 hosts": True,
        "no-op rerun of 50 hosts vs 5 hosts": True,
        "calls lost in the upgrade of 50 hosts": True,
        "first deploy of 50 hosts": True,
    }
    slow = scale.targets({5: fleet(100, 4, 40, 40), 50: fleet(700, 16, 160, 120, lost=1)})
    assert not any(t.ok for t in slow)
    assert not any(t.ok for t in scale.targets({5: fleet(100, 4, 40, 40)}))


def test_sizes_are_read_sorted_and_bad_ones_refused():
    assert scale.parse_args(["--sizes", "10,5"]).sizes == (5, 10)
    assert scale.parse_args([]).sizes == (5, 10, 25, 50)
    for bad in ("x", "0,5", ""):
        with pytest.raises(SystemExit):
            scale.parse_args(["--sizes", bad])
