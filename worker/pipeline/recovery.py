"""Recoveries: an endpoint's deliveries in a window, sent again at the endpoint's pace.

A recovery is a row in the database with its window and a cursor. The runner here moves its
deliveries into the endpoint's parked backlog a batch at a time — the cursor advances in the
same transaction, so after a restart or a ``kill -9`` it resumes exactly where it was — and the
parking sweeper sends them at the pace the scheduler gives the endpoint
(:meth:`~worker.pipeline.scheduler.Scheduler.room`), never more attempts at once than its
cap, so that other endpoints' fresh deliveries are not held behind it. A recovered
delivery is a new attempt of the same (event, endpoint), with the same ``webhook-id``.

The backlog is topped up only while it is short, so a 100,000-delivery recovery does not turn
into 100,000 parked rows at once, and a recovery's ``queued`` count tells how far it has got.
"""

from __future__ import annotations

import asyncio

import structlog

from worker.ops.metrics import Metrics
from worker.pipeline.scheduler import Scheduler
from worker.store import Store

log = structlog.get_logger("sellfern_webhooks.recovery")

IDLE_POLL_SECONDS = 1.0
# While a recovery runs: often enough that a fast endpoint, which the sweeper sends up to
# 2,000 deliveries a second, does not run dry between two top-ups.
RUNNING_POLL_SECONDS = 0.25
# Deliveries a recovery parks at a time; it tops the backlog up while it holds fewer than AHEAD,
# so that the sweeper, which leases up to a batch while the one before is still being sent,
# finds the next one ready.
BATCH = 1_000
AHEAD = 2 * BATCH


class RecoveryRunner:
    def __init__(self, store: Store, scheduler: Scheduler, metrics: Metrics) -> None:
        self._store = store
        self._scheduler = scheduler
        self._metrics = metrics
        self._running = 0  # recoveries running at the last step

    async def run(self) -> None:
        """Advance every running recovery until cancelled."""
        while True:
            try:
                await self.step()
            except Exception as exc:
                log.warning("advancing recoveries failed; trying again", error=str(exc))
            await asyncio.sleep(RUNNING_POLL_SECONDS if self._running else IDLE_POLL_SECONDS)

    async def step(self) -> int:
        """Move the next batch of each running recovery whose endpoint's parked backlog is
        short into it; return how many deliveries were moved."""
        running = await self._store.recoveries.running()
        self._running = len(running)
        self._metrics.recoveries_running.set(len(running))
        moved = 0
        for recovery in running:
            if await self._store.parked.count(recovery.webhook_id) >= AHEAD:
                continue  # enough in line already; the sweeper is working through it
            count = await self._store.recoveries.park_next(recovery.id, BATCH)
            if count:
                self._scheduler.adopt([recovery.webhook_id])
                self._metrics.deliveries_recovered.inc(count)
                log.info(
                    "recovery advanced",
                    recovery_id=recovery.id,
                    webhook_id=recovery.webhook_id,
                    moved=count,
                )
            moved += count
        return moved
