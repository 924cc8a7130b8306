"""The benchmark harness still runs: ``python -m bench --quick`` end to end, in a subprocess.

It measures nothing here (the machine running the suite is busy); it checks that every
scenario produces numeric figures, in the table and in the JSON record, so the harness
cannot rot unnoticed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = (
    "ceiling",
    "throughput",
    "burst",
    "latency",
    "isolation",
    "live-isolation",
    "fanout",
    "backlog",
    "queries",
    "recovery",
    "ordered",
    "rate-limit",
    "processes",
    "tracing",
)
# Counts whose target is zero: zero is the expected value, not a harness that measured nothing.
MAY_BE_ZERO = ("deferrals at defaults, SQLite", "deferrals at defaults, PostgreSQL")
REPO_ROOT = Path(__file__).resolve().parent.parent


# Every scenario at its smallest still starts its own processes (a worker or a serve, token
# commands, nginx); on a busy two-core machine that alone takes a couple of minutes, and more
# beside the fault-injection scenarios of a parallel run.
RUN_SECONDS = 420


@pytest.mark.timeout(RUN_SECONDS + 10)
def test_quick_run_reports_every_scenario(tmp_path: Path) -> None:
    output = tmp_path / "quick.json"
    # The harness is the repository's own module, run with this interpreter.
    completed = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    record = json.loads(output.read_text())
    assert set(record["scenarios"]) == set(SCENARIOS)
    for name in SCENARIOS:
        figures = record["scenarios"][name]["figures"]
        assert figures, name
        for figure, value in figures.items():
            assert isinstance(value, int | float), (name, figure, value)
            assert math.isfinite(value), (name, figure, value)
            assert value > 0 or (figure in MAY_BE_ZERO and value == 0), (name, figure, value)
    targets = [f for f in record["figures"] if f["target"]]
    assert {f["scenario"] for f in targets} == {
        "throughput",
        "burst",
        "latency",
        "isolation",
        "live-isolation",
        "fanout",
        "backlog",
        "queries",
        "recovery",
        "ordered",
        "rate-limit",
        "processes",
        "tracing",
    }
    assert all(isinstance(f["passed"], bool) for f in targets)
    sinks = {f["scenario"]: f["sink"] for f in record["figures"]}
    assert sinks["ceiling"] == sinks["throughput"] == sinks["burst"] == sinks["ordered"] == "nginx"
    assert sinks["latency"] == sinks["live-isolation"] == "python"

    table_rows = {line.split()[0] for line in completed.stdout.splitlines() if line.strip()}
    assert set(SCENARIOS) <= table_rows
