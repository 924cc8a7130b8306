"""Parking: a slow endpoint's backlog waits in the database, not in the broker.

When the scheduler finds an endpoint slow and every one of its slots taken or spoken for, a
task offered now could only be deferred, and deferred again: each round costs a publish, a
consume and an ack, CPU that the other endpoints' deliveries need. Fan-out instead writes the
delivery as ``parked``, in the same transaction as the event, and publishes nothing. The
sweeper here releases parked deliveries to ``webhooks.deliveries`` about as fast as the
endpoint can take them (the scheduler's :meth:`~worker.pipeline.scheduler.Scheduler.room`),
oldest first.

Nothing is lost: the event is acked only once its parked rows are committed, and a row leaves
``parked`` only in the transaction that claimed it, after its task is confirmed by the broker.
Each worker sweeps the endpoints it parked, and now and then adopts parked rows of any
endpoint, so the backlog of a worker that died is picked up by another.
"""

from __future__ import annotations

import asyncio
import json

import structlog

from worker.ops.metrics import Metrics
from worker.pipeline.publisher import TaskQueue
from worker.pipeline.scheduler import Scheduler
from worker.pipeline.tasks import encode_task
from worker.store import Store

log = structlog.get_logger("sellfern_webhooks.parking")

SWEEP_SECONDS = 0.5
# How often a worker looks for parked deliveries it did not park itself (and counts them all).
ADOPT_SECONDS = 30.0


class ParkingSweeper:
    def __init__(
        self, store: Store, scheduler: Scheduler, tasks: TaskQueue, metrics: Metrics
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._tasks = tasks
        self._metrics = metrics

    async def run(self) -> None:
        """Sweep until cancelled."""
        adopted_at = -ADOPT_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - adopted_at >= ADOPT_SECONDS:
                    counts = await self._store.parked.counts()
                    self._scheduler.adopt(list(counts))
                    self._metrics.parked.set(sum(counts.values()))
                    adopted_at = loop.time()
                await self.sweep()
            except Exception as exc:
                log.warning("releasing parked deliveries failed; trying again", error=str(exc))
            await asyncio.sleep(SWEEP_SECONDS)

    async def sweep(self) -> int:
        """Release what each parked endpoint can take until the next sweep; return how many."""
        released = 0
        for webhook_id in self._scheduler.parked():
            room = self._scheduler.room(webhook_id, SWEEP_SECONDS)
            if room <= 0:
                continue
            mark = self._scheduler.park_mark(webhook_id)
            async with self._store.parked.claim(webhook_id, room) as rows:
                # Each release is counted by the scheduler as a slot spoken for until it comes
                # round, so the next sweep does not release more than the endpoint can start.
                await asyncio.gather(
                    *(
                        self._tasks.queue(
                            webhook_id,
                            encode_task(
                                event_id, webhook_id, attempts + 1, json.dumps(event).encode()
                            ),
                            released=True,
                        )
                        for event_id, event, attempts in rows
                    )
                )
            if len(rows) < room:
                # Drained, unless a delivery was parked while this sweep ran: the mark says.
                self._scheduler.drained(webhook_id, mark)
            released += len(rows)
        if released:
            self._metrics.parked_released.inc(released)
        return released
