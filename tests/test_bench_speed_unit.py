"""The bench's host-speed probe (``bench.speed``): what its figures mean."""

from __future__ import annotations

import pytest

from bench.speed import probe_ms, spread

pytestmark = pytest.mark.unit


def test_spread_is_the_slowest_probe_over_the_fastest() -> None:
    assert spread([10.0, 12.5, 11.0]) == 1.25
    assert spread([9.7, 9.7]) == 1.0


def test_spread_of_no_usable_probe_is_unknown() -> None:
    assert spread([]) is None
    assert spread([0.0, 3.0]) is None


def test_a_probe_times_its_work_in_cpu_milliseconds() -> None:
    # One run of a tenth of the work: some CPU, far below a second on any machine.
    assert 0 < probe_ms(repeats=1, items=6_000) < 1_000
