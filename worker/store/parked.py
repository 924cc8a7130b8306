"""Parked deliveries: a slow endpoint's backlog, waiting in the database (state ``parked``)
instead of in the broker until the endpoint has room (see :mod:`worker.pipeline.parking`).

Fan-out parks deliveries through the pipeline's batch write; this repository counts them and
leases them out to the sweeper, which makes their attempts, and parks the delivery of a task
that comes round for an endpoint that has turned ordered, for the endpoint's lane.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.records import utcnow
from worker.store.tables import deliveries, events, one_of


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

    async def lease(
        self, webhook_id: str, limit: int, seconds: float
    ) -> list[tuple[str, dict[str, Any], int]]:
        """Lease the oldest ``limit`` parked deliveries of an endpoint for ``seconds``; return
        them as (event id, event, attempts so far): a delivery parked again by a recovery has
        attempts already, and its next one is number ``attempts + 1``.

        A leased delivery stays ``parked``, its lease's end in ``next_attempt_at``, until its
        attempt is recorded (which moves it on) or it is handed back (:meth:`hold`,
        :meth:`unpark`). A worker that dies with deliveries leased loses none: once the lease
        has run out, any sweep leases them again. Two leases never take the same row: the
        update takes only rows whose lease is over, and ``FOR UPDATE SKIP LOCKED`` keeps two
        PostgreSQL sweeps off each other's rows while they choose.
        """
        now = utcnow()
        free = sa.or_(deliveries.c.next_attempt_at.is_(None), deliveries.c.next_attempt_at <= now)
        query = (
            sa.select(deliveries.c.event_id, events.c.payload, deliveries.c.attempts)
            .join(events, events.c.id == deliveries.c.event_id)
            .where(deliveries.c.state == "parked", deliveries.c.webhook_id == webhook_id, free)
            .order_by(deliveries.c.created_at, deliveries.c.event_id)
            .limit(limit)
            .with_for_update(of=deliveries, skip_locked=True)
        )
        async with self._engine.begin() as connection:
            chosen = {
                event_id: (dict(payload), int(tries))
                for event_id, payload, tries in await connection.execute(query)
            }
            if not chosen:
                return []
            taken = await connection.execute(
                deliveries.update()
                .where(
                    deliveries.c.webhook_id == webhook_id,
                    one_of(deliveries.c.event_id, chosen, self._engine.dialect),
                    deliveries.c.state == "parked",
                    free,
                )
                .values(next_attempt_at=now + timedelta(seconds=seconds))
                .returning(deliveries.c.event_id)
            )
            leased = {event_id for (event_id,) in taken}
        return [(event_id, *chosen[event_id]) for event_id in chosen if event_id in leased]

    async def park(self, webhook_id: str, event_id: str, attempt: int) -> bool:
        """Park the delivery of a task for attempt ``attempt`` that came round once its
        endpoint was ordered, into the backlog the endpoint's lane sends in order; a pending
        delivery keeps its next time and its attempts (the lane makes the next one).

        Return False when the task must come round again later: its delivery is parked with
        fewer attempts than come before ``attempt``, so a sweep published it as the retry of an
        attempt whose record (which makes the delivery pending) is still to be written. Any
        other task has done its part: its delivery is parked now or already was (the task is a
        duplicate, or its event was parked again), or it has ended.
        """
        mine = sa.and_(deliveries.c.webhook_id == webhook_id, deliveries.c.event_id == event_id)
        async with self._engine.begin() as connection:
            parked = await connection.execute(
                deliveries.update()
                .where(mine, deliveries.c.state == "pending")
                .values(state="parked", updated_at=utcnow())
                .returning(deliveries.c.event_id)
            )
            if parked.first() is not None:
                return True
            query = sa.select(deliveries.c.state, deliveries.c.attempts).where(mine)
            row = (await connection.execute(query)).first()
        return row is None or row.state != "parked" or row.attempts >= attempt - 1

    async def hold(self, webhook_id: str, event_ids: Sequence[str], until: datetime) -> None:
        """Hand leased deliveries back to the backlog, not to be leased before ``until``
        (now, for at once)."""
        await self._update(webhook_id, event_ids, next_attempt_at=until)

    async def unpark(self, webhook_id: str, event_ids: Sequence[str]) -> None:
        """Move leased deliveries out of the backlog, to ``pending``: their endpoint was
        paused or deleted, and their attempts skipped."""
        await self._update(webhook_id, event_ids, state="pending", next_attempt_at=None)

    async def _update(self, webhook_id: str, event_ids: Sequence[str], **values: Any) -> None:  # noqa: ANN401
        if not event_ids:
            return
        async with self._engine.begin() as connection:
            await connection.execute(
                deliveries.update()
                .where(
                    deliveries.c.webhook_id == webhook_id,
                    one_of(deliveries.c.event_id, event_ids, self._engine.dialect),
                    deliveries.c.state == "parked",
                )
                .values(updated_at=utcnow(), **values)
            )
