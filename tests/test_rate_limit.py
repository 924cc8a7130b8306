"""An endpoint's ``rate_limit`` holds across three worker processes, and a PATCH of it applies.

Three ``python -m worker.cli worker`` child processes on PostgreSQL share one endpoint of the
real HTTPS receiver, which notes when each request arrives. A backlog of events is published
at once, enough to keep the endpoint at its limit for the whole measurement. The arrival rate
must stay within the limit (each worker takes a third of it, see
:mod:`worker.pipeline.pacing`) and reach it; a PATCH of the limit through the API (whose change
notice every worker receives) must apply within seconds. Nothing is failed for the limit: it
parks and defers, never records a failure, and every event is delivered once it is lifted.

It prints one line:

    rate-limit: limit=… measured=…/s (5 s windows …-…) | limit=… measured=…/s after …s |
    published=… delivered=… duplicates=…
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import sqlalchemy as sa
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from schemas.publish import publish_event
from tests.chaos_support import WorkerProcess, queues_idle, worker_env
from tests.conftest import (
    TEST_SECRET_KEY,
    Figures,
    Receiver,
    eventually,
    make_settings,
    run_service,
)
from worker import runtime
from worker.pipeline import topology
from worker.pipeline.worker import WORKER_COUNT_SECONDS
from worker.store import Store
from worker.store.tables import attempts, deliveries

pytestmark = pytest.mark.timeout(120)

WORKERS = 3
LIMIT = 30
LOWER_LIMIT = 10
PATH = "/limited"
# After the three workers run: one count of the consumers (every WORKER_COUNT_SECONDS) gives
# each its third; then the backlog's first releases settle.
SETTLE_SECONDS = WORKER_COUNT_SECONDS + 2
MEASURE_SECONDS = 15.0
SUB_WINDOW_SECONDS = 5.0
# A PATCH applies within this long (the change notice, else the policies' 5 s refresh)...
APPLY_WITHIN_SECONDS = 6.0
# ... and then holds over this long.
LOWER_SECONDS = 10.0
TOLERANCE = 1.10
REACHED = 0.8
# Enough for the settle, the measurement and the lower limit, and a margin.
EVENTS = round(LIMIT * (SETTLE_SECONDS + MEASURE_SECONDS + 3) + LOWER_LIMIT * 30)
PUBLISH_CONCURRENCY = 20
TEST_SCHEDULE = (0.3, 0.3)
# Without a limit the rest goes in a second or two; a task deferred while the limit held
# comes back after its tier (1 s, 5 s, or 30 s for the last turns of a long line).
DRAIN_SECONDS = 40


@pytest.fixture
async def workers(
    postgres_url: str, amqp_url: str, ca_bundle: str, tmp_path: Path
) -> AsyncIterator[list[WorkerProcess]]:
    """Three worker processes on the session's database and vhost, running."""
    env = worker_env(postgres_url, amqp_url, ca_bundle, secret_keys=TEST_SECRET_KEY)
    processes = []
    for n in range(WORKERS):
        log_dir = tmp_path / f"worker-{n}"
        log_dir.mkdir()
        processes.append(WorkerProcess(env, log_dir))
    try:
        await asyncio.gather(*(p.start() for p in processes))
        for process in processes:
            await eventually(process.started, timeout=30, what="worker started")
        yield processes
    finally:
        for process in processes:
            if process.running:
                code, _ = await process.terminate()
                assert code == 0, process.tail()
        await asyncio.gather(*(p.close() for p in processes))


class Api:
    """The management API alone, in this process (a pipeline worker would take a share of the
    limit), with a token of the test's organization."""

    def __init__(self, running: runtime.Running, http: aiohttp.ClientSession, token: str) -> None:
        self.store = running.store
        self._base = f"http://127.0.0.1:{running.api_port}/api/v2"
        self._http = http
        self._headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._http.request(
            method, f"{self._base}{path}", json=body, headers=self._headers
        ) as response:
            answer: dict[str, Any] = await response.json()
            assert response.status in {200, 201}, answer
            return answer


@pytest.fixture
async def client(postgres_url: str, amqp_url: str, ca_bundle: str, org: str) -> AsyncIterator[Api]:
    settings = make_settings(postgres_url, amqp_url, ca_bundle)
    async with run_service(settings, "api") as running, aiohttp.ClientSession() as http:
        _, token = await running.store.tokens.create(org, ("webhooks:manage",), "test")
        yield Api(running, http, token)


async def _until(moment: float) -> None:
    """Sleep until ``moment`` (monotonic): a measurement's window, not a synchronisation."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def rate(arrivals: Sequence[float], start: float, seconds: float) -> float:
    """Requests a second that arrived in [start, start + seconds)."""
    return sum(1 for t in arrivals if start <= t < start + seconds) / seconds


def sub_rates(arrivals: Sequence[float], start: float, seconds: float, step: float) -> list[float]:
    """The rate over each ``step`` of [start, start + seconds)."""
    return [rate(arrivals, start + k * step, step) for k in range(int(seconds / step))]


def holds_after(arrivals: Sequence[float], changed: float, most: float) -> float | None:
    """The first half second after ``changed``, up to APPLY_WITHIN_SECONDS, from which the
    rate over the next LOWER_SECONDS is at most ``most``; None if there is none."""
    offsets = (k / 2 for k in range(int(APPLY_WITHIN_SECONDS * 2) + 1))
    return next((k for k in offsets if rate(arrivals, changed + k, LOWER_SECONDS) <= most), None)


async def _dead_letters(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.DEAD_QUEUE, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await connection.close()


async def _attempt_outcomes(store: Store, webhook_id: str) -> dict[bool, int]:
    query = (
        sa.select(attempts.c.success, sa.func.count())
        .where(attempts.c.webhook_id == webhook_id)
        .group_by(attempts.c.success)
    )
    async with store.engine.connect() as connection:
        return {bool(success): int(n) for success, n in await connection.execute(query)}


async def _states(store: Store, webhook_id: str) -> dict[str, int]:
    query = (
        sa.select(deliveries.c.state, sa.func.count())
        .where(deliveries.c.webhook_id == webhook_id)
        .group_by(deliveries.c.state)
    )
    async with store.engine.connect() as connection:
        return {str(state): int(n) for state, n in await connection.execute(query)}


async def _delayed(amqp_url: str) -> dict[str, int]:
    """Messages in the deliveries queue and each deferral tier: where an undelivered task is."""
    names = [topology.DELIVERIES_QUEUE, *map(topology.deferred_queue_name, topology.DEFER_TIERS)]
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        return {
            name: (await channel.declare_queue(name, passive=True)).declaration_result.message_count
            or 0
            for name in names
        }
    finally:
        await connection.close()


async def _delivered_within(store: Store, webhook_id: str, seconds: float) -> bool:
    """Every event's delivery is recorded succeeded within ``seconds`` (polling the database)."""
    deadline = time.monotonic() + seconds
    while (await _states(store, webhook_id)).get("succeeded", 0) < EVENTS:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def _publish(broker: AbstractRobustConnection, org: str, count: int) -> set[str]:
    """``count`` events at once, each confirmed; their ids."""
    confirmed: set[str] = set()
    indices = iter(range(count))

    async def pump() -> None:
        for i in indices:
            envelope = await publish_event(broker, "order.created", org, {"i": i})
            confirmed.add(envelope.id)

    await asyncio.gather(*(pump() for _ in range(PUBLISH_CONCURRENCY)))
    return confirmed


async def test_rate_limit_holds_across_three_workers_and_a_patch_applies(
    workers: list[WorkerProcess],
    client: Api,
    receiver: Receiver,
    broker: AbstractRobustConnection,
    amqp_url: str,
    org: str,
    figures: Figures,
) -> None:
    arrivals: list[float] = []

    async def note(_request: web.Request, _n: int) -> web.StreamResponse:
        # Counted as it arrives, before it is answered: what the limit is about.
        arrivals.append(time.monotonic())
        return web.Response(text="ok")

    receiver.behaviours[PATH] = note
    store = client.store
    dead_before = await _dead_letters(amqp_url)
    webhook = await client.call(
        "POST",
        "/webhooks",
        {"url": receiver.url(PATH), "events": ["order.created"], "rate_limit": LIMIT},
    )
    workers_up = time.monotonic()
    published = await _publish(broker, org, EVENTS)
    assert len(published) == EVENTS

    # --- at the limit -----------------------------------------------------------------------
    await receiver.wait_for(lambda _: bool(arrivals), timeout=15)
    start = max(workers_up + SETTLE_SECONDS, arrivals[0] + 2)
    await _until(start + MEASURE_SECONDS)
    measured = rate(arrivals, start, MEASURE_SECONDS)
    windows = sub_rates(arrivals, start, MEASURE_SECONDS, SUB_WINDOW_SECONDS)

    # --- a lower limit ----------------------------------------------------------------------
    await client.call("PATCH", f"/webhooks/{webhook['id']}", {"rate_limit": LOWER_LIMIT})
    patched = time.monotonic()
    await _until(patched + APPLY_WITHIN_SECONDS + LOWER_SECONDS)
    lowered = rate(arrivals, patched + APPLY_WITHIN_SECONDS, LOWER_SECONDS)
    applied_after = holds_after(arrivals, patched, TOLERANCE * LOWER_LIMIT)
    backlog_left = EVENTS - len(arrivals)
    failed_while_limited = (await _attempt_outcomes(store, webhook["id"])).get(False, 0)

    # --- lifted: the rest drains ------------------------------------------------------------
    await client.call("PATCH", f"/webhooks/{webhook['id']}", {"rate_limit": None})
    lifted = time.monotonic()
    try:
        drained = await _delivered_within(store, webhook["id"], DRAIN_SECONDS)
    finally:
        ids = [r.headers.get("webhook-id", "") for r in receiver.at(PATH)]
        figures(
            f"rate-limit: workers={WORKERS} limit={LIMIT} measured={measured:.1f}/s "
            f"(5 s windows {min(windows):.1f}-{max(windows):.1f}) | limit={LOWER_LIMIT} "
            f"measured={lowered:.1f}/s from {APPLY_WITHIN_SECONDS:g}s after the PATCH, "
            f"within it from {applied_after}s | published={len(published)} "
            f"delivered={len(set(ids))} duplicates={len(ids) - len(set(ids))} "
            f"left-at-lift={backlog_left} drained-in={time.monotonic() - lifted:.1f}s"
        )
    assert drained, f"not all delivered {DRAIN_SECONDS}s after the lift: " + str(
        {**await _states(store, webhook["id"]), **await _delayed(amqp_url)}
    )
    await eventually(lambda: queues_idle(amqp_url, TEST_SCHEDULE), timeout=15, what="idle")

    assert backlog_left > 0, "the backlog ran out before the end of the measurement"
    assert measured <= TOLERANCE * LIMIT, windows
    assert max(windows) <= TOLERANCE * LIMIT, windows
    assert measured >= REACHED * LIMIT, windows
    assert applied_after is not None, f"{lowered:.1f}/s with a limit of {LOWER_LIMIT}"
    assert lowered <= TOLERANCE * LOWER_LIMIT
    assert lowered >= REACHED * LOWER_LIMIT
    # The limit parks and defers; it never fails an attempt nor dead-letters a task.
    assert failed_while_limited == 0
    assert await _attempt_outcomes(store, webhook["id"]) == {True: len(ids)}
    assert await _states(store, webhook["id"]) == {"succeeded": EVENTS}
    assert published <= set(ids), "an event was not delivered"
    assert await _dead_letters(amqp_url) == dead_before
