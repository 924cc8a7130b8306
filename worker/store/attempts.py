"""Delivery attempts, as the API shows them: newest first, per endpoint.

Attempts are written by the pipeline in batches (:mod:`worker.store.pipeline_writes`); this
repository only reads them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.records import Attempt, Page, page_of
from worker.store.tables import attempts


def _attempt(row: sa.Row[Any]) -> Attempt:
    return Attempt(**row._asdict())


class AttemptRepository:
    """The ``attempts`` table, read side."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def list(
        self,
        webhook_id: str,
        limit: int,
        cursor: str | None,
        success: bool | None = None,
        *,
        event_id: str | None = None,
        event_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Page[Attempt]:
        """Attempts to one endpoint, newest first (keyset on the time-ordered id); only the
        successful (or failed) ones when ``success`` is given, only one event's or one event
        type's, only those made in ``[since, until]``."""
        query = sa.select(attempts).where(attempts.c.webhook_id == webhook_id)
        if cursor:
            query = query.where(attempts.c.id < cursor)
        if success is not None:
            query = query.where(attempts.c.success.is_(success))
        if event_id is not None:
            query = query.where(attempts.c.event_id == event_id)
        if event_type is not None:
            query = query.where(attempts.c.event_type == event_type)
        if since is not None:
            query = query.where(attempts.c.created_at >= since)
        if until is not None:
            query = query.where(attempts.c.created_at <= until)
        query = query.order_by(attempts.c.id.desc()).limit(limit + 1)
        async with self._engine.connect() as connection:
            rows = [_attempt(row) for row in await connection.execute(query)]
        return page_of(rows, limit, lambda a: a.id)

    async def get(self, webhook_id: str, attempt_id: str) -> Attempt | None:
        """One attempt, only if it was made to ``webhook_id``."""
        async with self._engine.connect() as connection:
            row = (
                await connection.execute(
                    sa.select(attempts).where(
                        attempts.c.id == attempt_id, attempts.c.webhook_id == webhook_id
                    )
                )
            ).first()
        return _attempt(row) if row else None

    async def last_number(self, event_id: str, webhook_id: str) -> int:
        """The highest attempt number of the event's delivery to the endpoint; 0 if none."""
        async with self._engine.connect() as connection:
            value = (
                await connection.execute(
                    sa.select(sa.func.max(attempts.c.attempt)).where(
                        attempts.c.event_id == event_id, attempts.c.webhook_id == webhook_id
                    )
                )
            ).scalar()
        return int(value or 0)
