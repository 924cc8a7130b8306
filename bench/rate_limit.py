"""``rate-limit``: one endpoint's ``rate_limit`` held by three workers that share it.

One endpoint on nginx with ``rate_limit`` = :data:`RATE_LIMIT` (100/s) gets a backlog published
at once, enough to keep it at its limit for the whole run; then three ``python -m worker.cli
worker`` processes start on it. Each takes a third of the limit (its share, over the consumers
of ``webhooks.deliveries`` that it counts every 5 s), fan-out parks what is beyond it, and each
worker's sweeper releases the parked backlog at its share.

Once the broker counts the three consumers, the run waits :data:`SETTLE_SECONDS` (each worker's
next count of the others), then counts the attempts recorded for the endpoint in the next
``rate_limit_seconds`` (30), by their ``attempts.created_at``: the worker's own time of
each answer, in PostgreSQL. Figures: the measured rate over the limit (at most 1.1), the rate
itself, and in the details the slowest and fastest 5-second windows.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import sqlalchemy as sa

from bench.harness import EVENT_TYPE, POLL_SECONDS, Bench, Outcome, ratio
from bench.load import order_event
from worker.pipeline import topology
from worker.pipeline.worker import WORKER_COUNT_SECONDS
from worker.store.tables import attempts

ORG = "org_bench_rate_limit"
PATH = "/rate-limit"
RATE_LIMIT = 100
WORKERS = 3
# After the broker counts every worker: each one's next count of the consumers, and a second.
SETTLE_SECONDS = WORKER_COUNT_SECONDS + 1
WINDOW_SECONDS = 5.0
START_SECONDS = 60
TARGET = 1.1
# The backlog outlasts the measurement by this long, so the endpoint never runs dry in it.
MARGIN_SECONDS = 10


async def _consumers(bench: Bench) -> int:
    """The consumers of ``webhooks.deliveries``, asked of the broker now (a robust channel's
    ``declare_queue(passive=True)`` answers from its first declaration)."""
    underlay = await bench.channel.get_underlay_channel()
    declared = await underlay.queue_declare(topology.DELIVERIES_QUEUE, passive=True)
    return declared.consumer_count or 0


async def _answered_at(bench: Bench, webhook_id: str, since: float, until: float) -> list[float]:
    """Unix times of the endpoint's attempts recorded in [since, until)."""
    query = sa.select(attempts.c.created_at).where(
        attempts.c.webhook_id == webhook_id,
        attempts.c.created_at >= datetime.fromtimestamp(since, UTC),
        attempts.c.created_at < datetime.fromtimestamp(until, UTC),
    )
    async with bench.store.engine.connect() as connection:
        return [at.timestamp() for (at,) in await connection.execute(query)]


async def _failed(bench: Bench, webhook_id: str) -> int:
    query = sa.select(sa.func.count()).where(
        attempts.c.webhook_id == webhook_id, attempts.c.success.is_(False)
    )
    async with bench.store.engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


async def rate_limit(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    sink = bench.nginx()
    outcome = Outcome("rate-limit", sink=sink.name)
    say = bench.say("rate-limit")
    seconds = bench.sizes.rate_limit_seconds
    await bench.reset()
    webhook = await bench.store.endpoints.create(
        ORG, sink.url(PATH), [EVENT_TYPE], "bench", enabled=True, rate_limit=RATE_LIMIT
    )
    # Enough for the start-up, the settling and the measurement, at the limit.
    count = round(RATE_LIMIT * (SETTLE_SECONDS + seconds + MARGIN_SECONDS))
    await bench.publisher.publish_all([order_event(ORG, n=i) for i in range(count)], say)
    async with AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(bench.worker(f"rate-limit-{n + 1}"))
            for n in range(WORKERS)
        ]
        deadline = time.monotonic() + START_SECONDS
        while await _consumers(bench) < WORKERS:
            for worker in workers:
                worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{WORKERS} workers not consuming after {START_SECONDS}s")
            await asyncio.sleep(POLL_SECONDS)
        start = time.time() + SETTLE_SECONDS
        end = start + seconds
        say(f"{WORKERS} workers consuming; measuring {seconds:g}s after {SETTLE_SECONDS:g}s")
        # The window's own length, plus a second for the batch writer to commit its last rows.
        await asyncio.sleep(end + 1 - time.time())
        for worker in workers:
            worker.check_alive()
        answered = await _answered_at(bench, webhook.id, start, end)
        failed = await _failed(bench, webhook.id)
        backlog_left = count - (await bench.attempts([webhook.id])).total
    windows = [
        sum(
            1
            for t in answered
            if start + k * WINDOW_SECONDS <= t < start + (k + 1) * WINDOW_SECONDS
        )
        / WINDOW_SECONDS
        for k in range(max(1, int(seconds // WINDOW_SECONDS)))
    ]
    measured = len(answered) / seconds
    outcome.add("measured rate / rate_limit", ratio(measured, RATE_LIMIT), "x", at_most=TARGET)
    outcome.add("measured rate", measured, "/s")
    outcome.details = {
        "rate_limit": RATE_LIMIT,
        "workers": WORKERS,
        "events": count,
        "seconds": seconds,
        "attempts_in_window": len(answered),
        "window_seconds": WINDOW_SECONDS,
        "min_window_rate": min(windows),
        "max_window_rate": max(windows),
        "failed_attempts": failed,
        "backlog_left_at_end": backlog_left,
    }
    outcome.notes.append(
        f"{count} events published at once for one endpoint on nginx with rate_limit="
        f"{RATE_LIMIT}/s, then {WORKERS} worker processes started on PostgreSQL; from "
        f"{SETTLE_SECONDS:g}s after the broker counted the {WORKERS} consumers, the attempts "
        f"recorded for it in the next {seconds:g}s (by attempts.created_at) over {seconds:g}s, "
        f"over the limit; min/max of {WINDOW_SECONDS:g}s windows in the details"
        + ("" if backlog_left > 0 else "; the backlog ran out before the end: rate understated")
    )
    return outcome
