"""``processes``: the same burst drained by one worker process and by two (``WORKER_PROCESSES``).

``--burst-events`` (10,000) events are published before the worker starts, for one endpoint on
nginx; then ``python -m worker.cli worker`` drains them with ``WORKER_PROCESSES=1`` and with
``2`` (a parent and two children), alternating, each ``rounds`` times (its best rate counts).
Both run with ``ENDPOINT_CONCURRENCY`` at the bench concurrency, so the endpoint's cap is not
what is measured. The clock runs from the first event a worker stored to the last attempt
recorded, as in the other pre-published scenarios.

The CPU split: CPU seconds (user + system, from ``/proc/<pid>/stat``) each side used from the
first stored event to the end of the drain — the worker's processes (the parent and, found by
their parent pid, its children), RabbitMQ (``beam.smp``), PostgreSQL (every ``postgres``
process) and nginx, counted per process (one that exited meanwhile is not counted). It shows
where the machine's cores went, and so whether a second worker process had a core to run on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.harness import EVENT_TYPE, Bench, Outcome, rate, ratio
from bench.load import order_event
from bench.procs import WorkerProcess
from bench.speed import probe_ms, spread

ORG = "org_bench_processes"
PATH = "/processes"
PROCESS_COUNTS = (1, 2)
TARGET_RATIO = 1.15
FIRST_EVENT_POLL_SECONDS = 0.02
# Which processes each side of the split is, by the kernel's name for them (comm).
SERVICES = {"beam.smp": "rabbitmq", "postgres": "postgres", "nginx": "nginx"}


def _processes() -> dict[int, tuple[str, int, float]]:
    """Every process now: pid -> (name, parent pid, CPU seconds used)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        # After the name: state, ppid, ... utime and stime are the 12th and 13th.
        found[int(stat.parent.name)] = (
            name,
            int(fields[1]),
            (int(fields[11]) + int(fields[12])) / tick,
        )
    return found


def cpu_by_process(worker_pid: int) -> dict[int, tuple[str, float]]:
    """pid -> (side, CPU seconds so far) of the worker's processes and the bench's services."""
    found = {}
    for pid, (name, ppid, cpu) in _processes().items():
        if worker_pid in (pid, ppid):
            found[pid] = ("worker", cpu)
        elif name in SERVICES:
            found[pid] = (SERVICES[name], cpu)
    return found


def cpu_split(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds used between two snapshots, per side; per process, so that one which
    started meanwhile counts from zero (one which exited meanwhile is not counted)."""
    split: dict[str, float] = defaultdict(float)
    for pid, (side, cpu) in after.items():
        split[side] += cpu - before.get(pid, (side, 0.0))[1]
    return {side: round(seconds, 2) for side, seconds in sorted(split.items())}


def worker_process_count(worker_pid: int) -> int:
    return sum(1 for pid, (_, ppid, _) in _processes().items() if worker_pid in (pid, ppid))


async def _first_stored(bench: Bench, worker: WorkerProcess) -> None:
    while await bench.first_event_at() is None:
        worker.check_alive()
        await asyncio.sleep(FIRST_EVENT_POLL_SECONDS)


async def _one_drain(bench: Bench, processes: int, label: str) -> dict[str, Any]:
    sink = bench.nginx()
    say = bench.say(label)
    await bench.reset()
    await bench.seed([(ORG, PATH, [EVENT_TYPE])], say, sink.base_url)
    envelopes = [order_event(ORG, n=i) for i in range(bench.sizes.burst_events)]
    await bench.publisher.publish_all(envelopes, say)
    extra = {"WORKER_PROCESSES": str(processes), "ENDPOINT_CONCURRENCY": str(bench.concurrency)}
    probe = probe_ms()  # the machine's speed as this side starts (bench.speed)
    async with bench.worker(label, extra) as worker:
        await _first_stored(bench, worker)
        before = await asyncio.to_thread(cpu_by_process, worker.pid)
        count = await bench.drain(worker, len(envelopes), time.time(), say)
        after = await asyncio.to_thread(cpu_by_process, worker.pid)
        seen = await asyncio.to_thread(worker_process_count, worker.pid)
    first = await bench.first_event_at()
    per_second = rate(count.total, first, count.last_at) if first else None
    cpu = cpu_split(before, after)
    say(f"{count.total} attempts at {per_second or 0:.0f}/s; CPU seconds {cpu}; probe {probe} ms")
    return {
        "worker_processes": processes,
        "processes_running": seen,
        "events": len(envelopes),
        "attempts": count.total,
        "failed_attempts": count.failed,
        "drain_rate": per_second,
        "drain_seconds": count.last_at - first if first and count.last_at else None,
        "cpu_seconds": cpu,
        "host_probe_ms": probe,
    }


async def processes(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("processes", sink=bench.nginx().name)
    rates: dict[int, list[float]] = {n: [] for n in PROCESS_COUNTS}
    for round_number in range(1, bench.sizes.rounds + 1):
        for n in PROCESS_COUNTS:
            run = await _one_drain(bench, n, f"processes-{n}-{round_number}")
            outcome.details[f"WORKER_PROCESSES={n} #{round_number}"] = run
            if run["drain_rate"] is not None:
                rates[n].append(run["drain_rate"])
    one, two = max(rates[1], default=None), max(rates[2], default=None)
    outcome.add("drain rate, 1 process", one, "/s")
    outcome.add("drain rate, 2 processes", two, "/s")
    outcome.add("ratio 2/1", ratio(two, one), "x", at_least=TARGET_RATIO)
    probes = [run["host_probe_ms"] for run in outcome.details.values()]
    outcome.add("host speed spread over its runs", spread(probes), "x")
    for key, run in outcome.details.items():
        outcome.notes.append(
            f"CPU seconds during the drain, {key}: {run['cpu_seconds']}; host probe before it "
            f"{run['host_probe_ms']} ms"
        )
    outcome.notes.append(
        f"{bench.sizes.burst_events} events pre-published for one endpoint on nginx, drained "
        f"by WORKER_PROCESSES=1 and =2 (ENDPOINT_CONCURRENCY={bench.concurrency}), alternating, "
        f"best of {bench.sizes.rounds}; {os.cpu_count()} cores on this machine, shared by the "
        "worker, RabbitMQ, PostgreSQL, nginx and the harness; CPU = user + system from the "
        "first stored event to the last attempt recorded, per process (one that exited "
        "meanwhile is not counted); host speed spread = the slowest over the fastest of the "
        "probes (bench.speed: a fixed piece of pure-Python work, timed in the harness just "
        "before each drain; higher is slower), 1.00 when every drain started at one speed"
    )
    return outcome
