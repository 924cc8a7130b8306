"""Recoveries: a window of one endpoint's deliveries sent again through the pipeline.

A recovery does not send anything itself. It is a row that remembers a window and a cursor;
workers call :meth:`RecoveryRepository.park_next` on each running one, which moves the next
batch of matching deliveries to ``parked``, where the parking sweeper sends them at the
endpoint's pace (see :mod:`worker.pipeline.parking`).

Which deliveries a recovery takes:

* The window is on the **delivery's** ``created_at`` (when the event was received for this
  endpoint), ``since <= created_at <= until``; without ``until``, until the recovery's
  creation.
* ``status="failed"`` (the default): deliveries whose last attempt failed, that is state
  ``failed`` (retries exhausted), or state ``pending`` with ``attempts > 0`` (between
  retries). The batch writer moves a delivery to ``succeeded`` on any successful attempt, so a
  pending delivery with attempts has had only failures.
* ``status="all"``: every delivery of the window, whatever its state.
* Either way, never a delivery already ``parked`` (it is waiting to be sent already) nor a
  fresh one (``pending`` with ``attempts = 0``: its first attempt is on its way).

Deliveries are taken in (``created_at``, ``event_id``) order; the cursor is the last one
parked, stored in the same transaction, so a recovery resumes exactly where it was after a
crash. ``total`` is the number matching at creation; ``queued`` the number parked so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.store.ids import new_id
from worker.store.records import Recovery, RecoveryStatus, utcnow
from worker.store.tables import deliveries, one_of, recoveries, webhooks

MAX_RECOVERY_DELIVERIES = 100_000


class RecoveryTooLargeError(Exception):
    """More deliveries match the window than one recovery may cover."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} deliveries match this window")
        self.limit = limit


def _recovery(row: sa.Row[Any]) -> Recovery:
    m = row._mapping  # noqa: SLF001 - SQLAlchemy's public row mapping
    return Recovery(
        id=m["id"],
        org_id=m["org_id"],
        webhook_id=m["webhook_id"],
        since=m["since"],
        until=m["until"],
        until_given=m["until_given"],
        status=m["status"],
        state=m["state"],
        total=m["total"],
        queued=m["queued"],
        created_at=m["created_at"],
        finished_at=m["finished_at"],
    )


def matching(
    webhook_id: str, since: datetime, until: datetime, status: RecoveryStatus
) -> sa.ColumnElement[bool]:
    """The deliveries a recovery of this window and status takes (see the module's text)."""
    state, tries = deliveries.c.state, deliveries.c.attempts
    conditions = [
        deliveries.c.webhook_id == webhook_id,
        deliveries.c.created_at >= since,
        deliveries.c.created_at <= until,
        state != "parked",
        sa.not_(sa.and_(state == "pending", tries == 0)),
    ]
    if status == "failed":
        conditions.append(sa.or_(state == "failed", sa.and_(state == "pending", tries > 0)))
    return sa.and_(*conditions)


class RecoveryRepository:
    """The ``recoveries`` table, and the deliveries each one parks."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgresql = engine.dialect.name == "postgresql"
        # SQLite has no row lock to serialize creations for one endpoint; there, the one
        # process that serves the API does, with a lock per endpoint held while it is asked for.
        self._creating: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _one_at_a_time(self, webhook_id: str) -> contextlib.AbstractAsyncContextManager[object]:
        """On SQLite, this process's lock for creations for ``webhook_id``; on PostgreSQL
        nothing, as the row lock taken in the transaction serializes them across processes."""
        if self._postgresql:
            return contextlib.nullcontext()
        lock = self._creating.get(webhook_id)
        if lock is None:
            lock = self._creating[webhook_id] = asyncio.Lock()
        return lock

    async def create(
        self,
        org_id: str,
        webhook_id: str,
        since: datetime,
        until: datetime | None,
        status: RecoveryStatus,
    ) -> Recovery:
        """Start a recovery, or return the running one of the same (endpoint, since, until,
        status); ``until=None`` means "until now" and matches a running one started so.

        Raises :class:`RecoveryTooLargeError` (and writes nothing) when more than
        ``MAX_RECOVERY_DELIVERIES`` deliveries match. The caller checks that the endpoint is
        the organization's and enabled, and that the window is valid.
        """
        async with self._one_at_a_time(webhook_id), self._engine.begin() as connection:
            now = utcnow()
            if self._postgresql:
                # Serializes creations for one endpoint, so that a duplicate finds the first.
                await connection.execute(
                    sa.select(webhooks.c.id).where(webhooks.c.id == webhook_id).with_for_update()
                )
            running = await self._running_same(connection, webhook_id, since, until, status)
            if running is not None:
                return running
            end = until if until is not None else now
            bounded = (
                sa.select(sa.literal(1))
                .select_from(deliveries)
                .where(matching(webhook_id, since, end, status))
                .limit(MAX_RECOVERY_DELIVERIES + 1)
                .subquery()
            )
            total = int(
                (
                    await connection.execute(sa.select(sa.func.count()).select_from(bounded))
                ).scalar_one()
            )
            if total > MAX_RECOVERY_DELIVERIES:
                raise RecoveryTooLargeError(MAX_RECOVERY_DELIVERIES)
            values = {
                "id": new_id("rcv"),
                "org_id": org_id,
                "webhook_id": webhook_id,
                "since": since,
                "until": end,
                "until_given": until is not None,
                "status": status,
                "state": "running",
                "total": total,
                "queued": 0,
                "created_at": now,
                "finished_at": None,
            }
            row = (
                await connection.execute(
                    recoveries.insert().values(**values).returning(*recoveries.c)
                )
            ).one()
        return _recovery(row)

    async def _running_same(
        self,
        connection: AsyncConnection,
        webhook_id: str,
        since: datetime,
        until: datetime | None,
        status: RecoveryStatus,
    ) -> Recovery | None:
        query = sa.select(recoveries).where(
            recoveries.c.webhook_id == webhook_id,
            recoveries.c.state == "running",
            recoveries.c.since == since,
            recoveries.c.status == status,
        )
        if until is None:
            query = query.where(recoveries.c.until_given.is_(False))
        else:
            query = query.where(recoveries.c.until_given.is_(True), recoveries.c.until == until)
        row = (await connection.execute(query.order_by(recoveries.c.id).limit(1))).first()
        return _recovery(row) if row else None

    async def get(self, org_id: str, webhook_id: str, recovery_id: str) -> Recovery | None:
        """The recovery, only if it is of that endpoint of that organization."""
        query = sa.select(recoveries).where(
            recoveries.c.id == recovery_id,
            recoveries.c.webhook_id == webhook_id,
            recoveries.c.org_id == org_id,
        )
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return _recovery(row) if row else None

    async def running(self) -> list[Recovery]:
        """Every running recovery, of every organization, oldest first (for workers)."""
        query = (
            sa.select(recoveries).where(recoveries.c.state == "running").order_by(recoveries.c.id)
        )
        async with self._engine.connect() as connection:
            return [_recovery(row) for row in await connection.execute(query)]

    async def park_next(self, recovery_id: str, batch: int) -> int:
        """Park the next ``batch`` matching deliveries after the recovery's cursor; return
        how many. In one transaction: the deliveries move to ``parked``, the cursor and
        ``queued`` advance, and when fewer than ``batch`` were left the recovery is ``done``.
        A recovery that is done or unknown parks nothing."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        now = utcnow()
        async with self._engine.begin() as connection:
            row = (
                await connection.execute(
                    sa.select(recoveries)
                    .where(recoveries.c.id == recovery_id)
                    .with_for_update()  # two workers on one recovery take turns
                )
            ).first()
            if row is None or row.state != "running":
                return 0
            query = sa.select(deliveries.c.event_id, deliveries.c.created_at).where(
                matching(row.webhook_id, row.since, row.until, row.status)
            )
            if row.cursor_created_at is not None:
                query = query.where(
                    sa.or_(
                        deliveries.c.created_at > row.cursor_created_at,
                        sa.and_(
                            deliveries.c.created_at == row.cursor_created_at,
                            deliveries.c.event_id > row.cursor_event_id,
                        ),
                    )
                )
            query = (
                query.order_by(deliveries.c.created_at, deliveries.c.event_id)
                .limit(batch)
                .with_for_update(of=deliveries)
            )
            taken = (await connection.execute(query)).all()
            changes: dict[str, Any] = {"queued": row.queued + len(taken)}
            if taken:
                await connection.execute(
                    deliveries.update()
                    .where(
                        deliveries.c.webhook_id == row.webhook_id,
                        one_of(
                            deliveries.c.event_id,
                            [t.event_id for t in taken],
                            self._engine.dialect,
                        ),
                    )
                    .values(state="parked", next_attempt_at=None, updated_at=now)
                )
                changes["cursor_created_at"] = taken[-1].created_at
                changes["cursor_event_id"] = taken[-1].event_id
            if len(taken) < batch:
                changes.update(state="done", finished_at=now)
            await connection.execute(
                recoveries.update().where(recoveries.c.id == recovery_id).values(**changes)
            )
        return len(taken)
