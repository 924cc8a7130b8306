"""Events as received, kept for redelivery, and the per-endpoint delivery state of each.

Events and deliveries are written by the pipeline (:mod:`worker.store.pipeline_writes`);
this repository reads them back and enforces retention.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.records import DeliveryState
from worker.store.tables import attempts, deliveries, events


class EventRepository:
    """The ``events`` and ``deliveries`` tables, read side, and retention over them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(self, event_id: str) -> dict[str, Any] | None:
        """The event's envelope as received, or None if unknown (or pruned)."""
        async with self._engine.connect() as connection:
            payload = (
                await connection.execute(sa.select(events.c.payload).where(events.c.id == event_id))
            ).scalar()
        return dict(payload) if payload is not None else None

    async def delivery_state(self, event_id: str, webhook_id: str) -> DeliveryState | None:
        """The state of the event's delivery to the endpoint; None if there is none."""
        async with self._engine.connect() as connection:
            return (
                await connection.execute(
                    sa.select(deliveries.c.state).where(
                        deliveries.c.event_id == event_id, deliveries.c.webhook_id == webhook_id
                    )
                )
            ).scalar()

    async def prune(self, older_than: datetime) -> tuple[int, int]:
        """Delete events and attempts older than ``older_than``; return how many of each.

        An old event's deliveries go with it, whatever their state: without the event they
        could never be attempted again.
        """
        async with self._engine.begin() as connection:
            pruned_attempts = await connection.execute(
                attempts.delete().where(attempts.c.created_at < older_than)
            )
            old_events = sa.select(events.c.id).where(events.c.received_at < older_than)
            await connection.execute(
                deliveries.delete().where(deliveries.c.event_id.in_(old_events))
            )
            pruned_events = await connection.execute(
                events.delete().where(events.c.received_at < older_than)
            )
        return pruned_events.rowcount, pruned_attempts.rowcount
