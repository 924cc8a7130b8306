"""Events as received, kept for redelivery, and the per-endpoint delivery state of each.

Events and deliveries are written by the pipeline (:mod:`worker.store.pipeline_writes`);
this repository reads them back and enforces retention.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.records import DeliveryState, EventDelivery, Page, StoredEvent, page_of
from worker.store.tables import attempts, deliveries, events, one_of, webhooks


def _stored_event(row: sa.Row[Any, Any, Any, Any, Any]) -> StoredEvent:
    payload = row.payload
    data = payload.get("data") if isinstance(payload, dict) else None
    return StoredEvent(
        id=row.id,
        type=row.type,
        occurred_at=row.occurred_at,
        received_at=row.received_at,
        data=dict(data) if isinstance(data, dict) else {},
    )


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

    async def list_for_org(
        self,
        org_id: str,
        limit: int,
        cursor: str | None = None,
        *,
        event_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Page[StoredEvent]:
        """An organization's events, newest received first, keyset on (received_at, id).

        ``cursor`` is the id of the last event of the previous page; ``since`` and ``until``
        bound ``received_at`` (both inclusive).
        """
        query = sa.select(
            events.c.id, events.c.type, events.c.occurred_at, events.c.received_at,
            events.c.payload,
        ).where(events.c.org_id == org_id)  # fmt: skip
        if event_type is not None:
            query = query.where(events.c.type == event_type)
        if since is not None:
            query = query.where(events.c.received_at >= since)
        if until is not None:
            query = query.where(events.c.received_at <= until)
        if cursor:
            marked = events.alias("cursor_event")
            mark = (
                sa.select(marked.c.received_at)
                .where(marked.c.id == cursor, marked.c.org_id == org_id)
                .scalar_subquery()
            )
            query = query.where(
                sa.or_(
                    events.c.received_at < mark,
                    sa.and_(events.c.received_at == mark, events.c.id < cursor),
                )
            )
        query = query.order_by(events.c.received_at.desc(), events.c.id.desc()).limit(limit + 1)
        async with self._engine.connect() as connection:
            rows = [_stored_event(row) for row in await connection.execute(query)]
        return page_of(rows, limit, lambda e: e.id)

    async def get_for_org(self, org_id: str, event_id: str) -> StoredEvent | None:
        """The event, only if it belongs to ``org_id``."""
        query = sa.select(
            events.c.id, events.c.type, events.c.occurred_at, events.c.received_at,
            events.c.payload,
        ).where(events.c.id == event_id, events.c.org_id == org_id)  # fmt: skip
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return _stored_event(row) if row else None

    async def deliveries_of(self, org_id: str, event_id: str) -> list[EventDelivery]:
        """The event's delivery to each endpoint of ``org_id`` it was fanned out to, with the
        time and status code of each one's latest attempt (highest number, then newest)."""
        rows_query = (
            sa.select(
                deliveries.c.webhook_id, deliveries.c.state, deliveries.c.attempts,
                deliveries.c.next_attempt_at,
            )
            .join(webhooks, webhooks.c.id == deliveries.c.webhook_id)
            .where(deliveries.c.event_id == event_id, webhooks.c.org_id == org_id)
            .order_by(deliveries.c.webhook_id)
        )  # fmt: skip
        attempts_query = (
            sa.select(attempts.c.webhook_id, attempts.c.created_at, attempts.c.status_code)
            .where(attempts.c.event_id == event_id, attempts.c.org_id == org_id)
            .order_by(attempts.c.attempt, attempts.c.created_at, attempts.c.id)
        )
        async with self._engine.connect() as connection:
            rows = (await connection.execute(rows_query)).all()
            latest = {
                row.webhook_id: (row.created_at, row.status_code)
                for row in await connection.execute(attempts_query)
            }  # ascending: the last one per endpoint wins
        return [
            EventDelivery(
                webhook_id=row.webhook_id,
                state=row.state,
                attempts=row.attempts,
                last_attempt_at=latest.get(row.webhook_id, (None, None))[0],
                last_status_code=latest.get(row.webhook_id, (None, None))[1],
                next_attempt_at=row.next_attempt_at if row.state == "pending" else None,
            )
            for row in rows
        ]

    async def progress(self, event_id: str) -> dict[str, tuple[DeliveryState, int]]:
        """Each delivery of the event that exists: its state and attempts made, by endpoint."""
        query = sa.select(deliveries.c.webhook_id, deliveries.c.state, deliveries.c.attempts).where(
            deliveries.c.event_id == event_id
        )
        async with self._engine.connect() as connection:
            return {
                row.webhook_id: (row.state, int(row.attempts))
                for row in await connection.execute(query)
            }

    async def succeeded(self, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """Which of these (event id, endpoint id) deliveries have succeeded, in one query."""
        wanted = set(keys)
        query = sa.select(deliveries.c.event_id, deliveries.c.webhook_id).where(
            one_of(deliveries.c.event_id, {e for e, _ in wanted}, self._engine.dialect),
            deliveries.c.state == "succeeded",
        )
        async with self._engine.connect() as connection:
            found = {(row.event_id, row.webhook_id) for row in await connection.execute(query)}
        return dict.fromkeys(found & wanted, True)

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
