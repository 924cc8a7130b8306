"""Parked deliveries: a slow endpoint's backlog, waiting in the database (state ``parked``)
instead of in the broker until the endpoint has room (see :mod:`worker.pipeline.parking`).

Fan-out parks deliveries through the pipeline's batch write; this repository counts them and
hands them back out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.records import utcnow
from worker.store.tables import deliveries, events


class ParkedDeliveries:
    """The ``deliveries`` rows in state ``parked``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def counts(self) -> dict[str, int]:
        """How many deliveries are parked in the database per endpoint, by any worker."""
        query = (
            sa.select(deliveries.c.webhook_id, sa.func.count().label("parked"))
            .where(deliveries.c.state == "parked")
            .group_by(deliveries.c.webhook_id)
        )
        async with self._engine.connect() as connection:
            return {row.webhook_id: row.parked for row in await connection.execute(query)}

    async def count(self, webhook_id: str) -> int:
        """How many deliveries of one endpoint are parked (the partial index over parked rows
        answers it)."""
        query = sa.select(sa.func.count()).where(
            deliveries.c.state == "parked", deliveries.c.webhook_id == webhook_id
        )
        async with self._engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())

    @asynccontextmanager
    async def claim(
        self, webhook_id: str, limit: int
    ) -> AsyncIterator[list[tuple[str, dict[str, Any], int]]]:
        """Claim the oldest ``limit`` parked deliveries of an endpoint, as (event id, event,
        attempts so far): a delivery parked again by a recovery has attempts already, and its
        next one is number ``attempts + 1``.

        Used as ``async with parked.claim(webhook_id, n) as rows:``. The rows stay locked, and
        parked, for the whole block: if it ends cleanly they are marked ``pending`` in the
        same transaction; if it raises, the transaction rolls back and they stay parked, to
        be claimed again later. A caller that publishes the rows inside the block therefore
        never loses one (a crash after publishing gives a duplicate at worst). Two claims
        never get the same row: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serves one
        worker, whose sweeps run one at a time.
        """
        query = (
            sa.select(deliveries.c.event_id, events.c.payload, deliveries.c.attempts)
            .join(events, events.c.id == deliveries.c.event_id)
            .where(deliveries.c.state == "parked", deliveries.c.webhook_id == webhook_id)
            .order_by(deliveries.c.created_at, deliveries.c.event_id)
            .limit(limit)
            .with_for_update(of=deliveries, skip_locked=True)
        )
        async with self._engine.begin() as connection:
            rows = [
                (event_id, dict(payload), int(tries))
                for event_id, payload, tries in await connection.execute(query)
            ]
            # Taken before the block runs: what it does with the list changes nothing here.
            claimed = [event_id for event_id, _, _ in rows]
            yield rows
            if claimed:
                await connection.execute(
                    deliveries.update()
                    .where(
                        deliveries.c.webhook_id == webhook_id,
                        deliveries.c.event_id.in_(claimed),
                        deliveries.c.state == "parked",
                    )
                    .values(state="pending", updated_at=utcnow())
                )
