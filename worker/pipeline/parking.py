"""Parking: a slow endpoint's backlog waits in the database, not in the broker.

When fan-out finds an endpoint slow (see :class:`worker.slots.ResponseTimes`) and every one
of its slots taken, a task offered now could only be deferred, and deferred again: each round
costs a publish, a consume and an ack, CPU that the other endpoints' deliveries need. Fan-out
instead writes the delivery as ``parked``, in the same transaction as the event, and
publishes nothing. The sweeper here releases parked deliveries to ``webhooks.deliveries``
about as fast as the endpoint can take them, oldest first.

Nothing is lost: the event is acked only once its parked rows are committed, and a row leaves
``parked`` only after its task is confirmed by the broker. Each worker sweeps the endpoints it
parked, and now and then looks for parked rows of any endpoint, so the backlog of a worker
that died is picked up by another.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import structlog

from worker.ops.metrics import Metrics
from worker.pipeline.delivery import Deliverer, encode_task
from worker.store.store import Store

log = structlog.get_logger("sellfern_webhooks.parking")

SWEEP_SECONDS = 0.5
# How often a worker looks for parked deliveries it did not park itself (and counts them all).
ADOPT_SECONDS = 30.0


class Parking:
    def __init__(self, store: Store, deliverer: Deliverer, metrics: Metrics) -> None:
        self._store = store
        self._deliverer = deliverer
        self._metrics = metrics
        self._endpoints: set[str] = set()

    def park(self, webhook_id: str) -> bool:
        """Whether a new delivery to this endpoint should be parked; if so, sweep it later.

        Once an endpoint has a parked backlog, its new deliveries join the back of it until it
        is drained: they neither jump ahead of the older ones nor crowd the slots the sweeper
        refills.
        """
        if webhook_id in self._endpoints:
            return True
        if not self._deliverer.saturated(webhook_id):
            return False
        self._endpoints.add(webhook_id)
        return True

    async def run(self) -> None:
        """Sweep until cancelled."""
        adopted_at = -ADOPT_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - adopted_at >= ADOPT_SECONDS:
                    parked = await self._store.parked_endpoints()
                    self._endpoints.update(parked)
                    self._metrics.parked.set(sum(parked.values()))
                    adopted_at = loop.time()
                await self.sweep()
            except Exception as exc:
                log.warning("releasing parked deliveries failed; trying again", error=str(exc))
            await asyncio.sleep(SWEEP_SECONDS)

    async def sweep(self) -> int:
        """Release what each parked endpoint can take until the next sweep; return how many."""
        released = 0
        for webhook_id in list(self._endpoints):
            room = self._deliverer.room(webhook_id, SWEEP_SECONDS)
            if room <= 0:
                continue
            count = await self._store.release_parked(
                webhook_id, room, functools.partial(self._publish, webhook_id)
            )
            if count < room:
                # Drained. A delivery parked while this sweep ran is found by the next
                # adoption, at most ADOPT_SECONDS later.
                self._endpoints.discard(webhook_id)
            released += count
        if released:
            self._metrics.parked_released.inc(released)
        return released

    async def _publish(self, webhook_id: str, found: list[tuple[str, dict[str, Any]]]) -> None:
        # Through the deliverer, which counts them as slots spoken for until they come round:
        # the next sweep does not release more than the endpoint can start.
        await asyncio.gather(
            *(
                self._deliverer.queue_new(
                    webhook_id, encode_task(event_id, webhook_id, 1, json.dumps(event).encode())
                )
                for event_id, event in found
            )
        )
