"""Ordered endpoints' backlogs, and the lease that lets one worker at a time send to each.

An ordered endpoint's deliveries are all parked by fan-out (and by recoveries); the worker
that holds the endpoint's lease sends them one at a time, in the order the events were
published — their ``occurred_at``, then the order the workers stored them (see
:meth:`OrderedBacklog.heads`; :mod:`worker.pipeline.ordered`).

The lease is a PostgreSQL session-level advisory lock, taken on one connection per worker
that holds every lease of that worker: if the worker dies, its connection closes and its
leases go with it, so another worker takes the endpoint over. The connection can also be lost
while the worker lives (a terminated backend, a restart, a cut), so a lane confirms its lease
on it before every attempt. On SQLite one process is the only worker, and the lease is kept
in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.store.tables import deliveries, events

# The first key of the two-key advisory locks taken here, so that they cannot meet any other
# advisory lock the database may hold. The second is the endpoint id's hashtext().
LEASE_CLASS = 0x5F0D
# How many of the oldest stored deliveries are put in the publisher's order (see heads).
WINDOW = 500
# How long confirming a lease may take before its connection counts as lost.
CONFIRM_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Head:
    """The next parked delivery of an ordered endpoint."""

    event_id: str
    event: dict[str, Any]
    attempts: int  # made so far: the next one is number ``attempts + 1``
    next_attempt_at: datetime | None  # when a failed head may be tried again


class OrderedBacklog:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def heads(self, webhook_id: str, stored_before: datetime, limit: int) -> list[Head]:
        """The next parked deliveries of the endpoint stored before ``stored_before``, in
        order: by the event's ``occurred_at``, then by when it was stored.

        Several workers store events at once, each a few milliseconds behind the queue at
        times, so storage order can swap neighbours that the publisher sent one after the
        other; their ``occurred_at`` (the publisher's clock) puts them back. Only the oldest
        :data:`WINDOW` stored are sorted so, through the parked index: an event stored that many
        places late is sent in storage order. Only the lease holder reads them, so nothing is
        locked."""
        window = (
            sa.select(
                deliveries.c.event_id, deliveries.c.attempts, deliveries.c.next_attempt_at,
                deliveries.c.created_at,
            )
            .where(
                deliveries.c.state == "parked",
                deliveries.c.webhook_id == webhook_id,
                deliveries.c.created_at < stored_before,
            )
            .order_by(deliveries.c.created_at, deliveries.c.event_id)
            .limit(WINDOW)
            .subquery()
        )  # fmt: skip
        # An event stored after the cut that occurred earlier than a candidate must go first:
        # the candidates stop short of the earliest such event.
        younger = (
            sa.select(sa.func.min(events.c.occurred_at))
            .select_from(deliveries.join(events, events.c.id == deliveries.c.event_id))
            .where(
                deliveries.c.state == "parked",
                deliveries.c.webhook_id == webhook_id,
                deliveries.c.created_at >= stored_before,
            )
            .scalar_subquery()
        )
        query = (
            sa.select(
                window.c.event_id, events.c.payload, window.c.attempts, window.c.next_attempt_at
            )
            .join(events, events.c.id == window.c.event_id)
            .where(sa.or_(younger.is_(None), events.c.occurred_at < younger))
            .order_by(events.c.occurred_at, window.c.created_at, window.c.event_id)
            .limit(limit)
        )
        async with self._engine.connect() as connection:
            return [
                Head(row.event_id, dict(row.payload), int(row.attempts), row.next_attempt_at)
                for row in await connection.execute(query)
            ]

    def leases(self) -> Leases:
        if self._engine.dialect.name == "postgresql":
            return AdvisoryLeases(self._engine)
        return Leases()


class Leases:
    """The endpoints this worker may send to in order. In memory: one process (SQLite)."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    async def acquire(self, webhook_id: str) -> bool:
        self._held.add(webhook_id)
        return True

    async def release(self, webhook_id: str) -> None:
        self._held.discard(webhook_id)

    def holds(self, webhook_id: str) -> bool:
        """Still ours, as far as this worker knows: checked between batches, without I/O."""
        return webhook_id in self._held

    async def confirm(self, webhook_id: str) -> bool:
        """Still ours, as the database sees it: checked before every attempt."""
        return self.holds(webhook_id)

    async def close(self) -> None:
        self._held.clear()


class AdvisoryLeases(Leases):
    """Leases as advisory locks on one dedicated PostgreSQL connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection

    async def acquire(self, webhook_id: str) -> bool:
        async with self._lock:
            try:
                connection = await self._connect()
                taken = (
                    await connection.execute(
                        sa.select(
                            sa.func.pg_try_advisory_lock(LEASE_CLASS, sa.func.hashtext(webhook_id))
                        )
                    )
                ).scalar_one()
            except Exception:
                await self._lost()
                raise
        if taken:
            self._held.add(webhook_id)
        return bool(taken)

    async def release(self, webhook_id: str) -> None:
        if webhook_id not in self._held:
            return
        self._held.discard(webhook_id)
        async with self._lock:
            if self._connection is None:
                return
            try:
                await self._connection.execute(
                    sa.select(sa.func.pg_advisory_unlock(LEASE_CLASS, sa.func.hashtext(webhook_id)))
                )
            except Exception:
                await self._lost()

    async def confirm(self, webhook_id: str) -> bool:
        """A session-level lock lasts as long as its session, and the session can end without
        this worker noticing — a terminated backend, a database restart, a cut connection —
        while another worker takes the lock: so the connection is asked to answer."""
        if webhook_id not in self._held:
            return False
        async with self._lock:
            if self._connection is None:
                return False
            try:
                async with asyncio.timeout(CONFIRM_SECONDS):
                    await self._connection.execute(sa.select(1))
            except Exception:
                await self._lost()
                return False
        return webhook_id in self._held

    async def close(self) -> None:
        async with self._lock:
            await self._lost()

    async def _connect(self) -> AsyncConnection:
        if self._connection is None:
            self._connection = await self._engine.connect()
            # Autocommit: the locks belong to the session, not to a transaction left open.
            await self._connection.execution_options(isolation_level="AUTOCOMMIT")
        return self._connection

    async def _lost(self) -> None:
        """The connection failed or closes: every lock it held is gone with it."""
        self._held.clear()
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # it may have failed already
                await connection.invalidate()
