"""The run's one table, and its JSON record."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.harness import Outcome


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit != "x" and float(value).is_integer():
        return f"{value:,.0f}"
    if unit == "x" or abs(value) < 1:
        return f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def table(outcomes: Sequence[Outcome]) -> str:
    # The sink column names the peer that answered the deliveries behind a figure: nginx
    # (bench.sink) or the Python receiver (bench.receiver).
    rows = [("scenario", "sink", "figure", "measured", "unit", "target", "")]
    for outcome in outcomes:
        for f in outcome.figures:
            verdict = "" if f.passed is None else ("ok" if f.passed else "MISS")
            value = _number(f.value, f.unit)
            rows.append((f.scenario, f.sink, f.name, value, f.unit, f.target, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i == 3 else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {o.scenario}: {note}" for o in outcomes for note in o.notes]
    return "\n".join([*lines, "", "how each was measured:", *notes])


def write_json(
    path: Path, outcomes: Sequence[Outcome], config: dict[str, Any], meta: dict[str, Any]
) -> None:
    record = {
        **meta,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": config,
        "scenarios": {
            o.scenario: {
                "figures": {f.name: f.value for f in o.figures},
                "details": o.details,
                "notes": o.notes,
            }
            for o in outcomes
        },
        "figures": [asdict(f) for o in outcomes for f in o.figures],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
