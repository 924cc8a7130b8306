"""How fast the machine's cores are at a given moment: a fixed piece of pure-Python work, timed.

The hosts these benchmarks run on share their physical cores with other guests, and a core's
speed drifts with their load, within minutes: the same loop took 0.74 s and 1.30 s
on one core within a minute, with nothing else of ours running. Every rate and CPU time of a
run drifts with it. Ratios of two sides measured in turn cancel a drift that is slow, not one
that changes between the turns. The probe, taken just before each side runs, says which case
a run was: its figures are the work's CPU milliseconds, so a higher one is a slower machine.
"""

from __future__ import annotations

import statistics
import time

PROBE_REPEATS = 5
PROBE_ITEMS = 60_000  # about 15 ms of CPU on the machines this was written on


def _work(items: int) -> int:
    # Dictionary stores, string formatting and integer arithmetic: what the interpreter spends
    # its time on in the service too, with no allocation that outlives a call.
    table: dict[int, str] = {}
    total = 0
    for i in range(items):
        table[i & 1023] = str(i)
        total += len(table[i & 511]) if (i & 511) in table else 0
    return total


def probe_ms(repeats: int = PROBE_REPEATS, items: int = PROBE_ITEMS) -> float:
    """The median CPU milliseconds of ``repeats`` runs of the fixed work (this thread's CPU
    time, so that other threads of the process do not count). Blocks for about 50 ms."""
    timings = []
    for _ in range(repeats):
        started = time.thread_time()
        _work(items)
        timings.append((time.thread_time() - started) * 1000)
    return round(statistics.median(timings), 2)


def spread(probes: list[float]) -> float | None:
    """Slowest probe over fastest: 1.0 when every side of a comparison ran at one speed."""
    if not probes or min(probes) <= 0:
        return None
    return round(max(probes) / min(probes), 2)
