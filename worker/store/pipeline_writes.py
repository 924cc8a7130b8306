"""The pipeline's batch write: events with their deliveries, and attempts with their effects.

This is the worker's hottest write, so it has two implementations of one
:class:`PipelineWrites` protocol: :class:`CorePipelineWrites` here (SQLAlchemy Core; SQLite,
and it works on PostgreSQL too) and :class:`~worker.store.pipeline_pg.AsyncpgPipelineWrites`
(asyncpg directly; what PostgreSQL uses). Both execute the same :class:`PreparedBatch`, built
once by :func:`prepare`: what a batch means — which rows, deduplicated and folded how, which
failure runs start or end — is decided in one place, and only the SQL differs. The tests
write one batch through each and compare the rows they leave.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.store.records import Attempt, AttemptRecord, DeliveryState, NewEvent, utcnow
from worker.store.tables import attempts, deliveries, events, webhooks

# An event: its id, org_id, type, occurred_at, payload (JSON text) and received_at.
EventRow = tuple[str, str, str, datetime, str, datetime]
# A delivery an event opens, with no attempt yet: event_id, webhook_id, state and created_at
# (its event's received_at).
OpenedRow = tuple[str, str, DeliveryState, datetime]
# A delivery advanced by attempts: event_id, webhook_id, state, attempts, next_attempt_at,
# created_at and updated_at.
AdvanceRow = tuple[str, str, DeliveryState, int, datetime | None, datetime, datetime]

ATTEMPT_COLUMNS = tuple(Attempt.__dataclass_fields__)


class PipelineWrites(Protocol):
    async def write_batch(self, batch: Sequence[NewEvent | AttemptRecord]) -> None:
        """Keep what the pipeline produced — events with their deliveries, and attempts with
        their delivery's new state and their endpoint's failure run — in one transaction:
        the hot path pays one commit per batch, whatever it holds. Events and deliveries are
        inserted only if new (repeating a batch is harmless); attempts always; a delivery
        advances without ever leaving ``succeeded``.

        One exception: a delivery already ``pending`` that an event's write parks becomes
        ``parked``. That is a redelivered event whose delivery the scheduler parked this time:
        its first attempt, or that attempt's retry, may have been lost with the message that
        is now redelivered, and left pending it would have no attempt, task or sweep to send
        it. The backlog's sweep sends it, at worst once more than needed."""


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch as rows, ready for either implementation to execute."""

    now: datetime  # when the batch was written
    events: list[EventRow]
    opened: list[OpenedRow]
    attempts: list[Attempt]
    advances: list[AdvanceRow]
    ended: list[str]  # endpoints whose failure run a success in the batch ends
    started: dict[str, datetime]  # endpoints whose run may start, at their first failure


def prepare(batch: Sequence[NewEvent | AttemptRecord]) -> PreparedBatch:
    """The rows ``batch`` writes.

    An event or delivery given twice keeps its first form, as an insert that ignores
    conflicts would; several attempts of one delivery are folded into one upsert row (a
    statement may not touch a row twice), as consecutive upserts would leave it.
    """
    new_events = [item for item in batch if isinstance(item, NewEvent)]
    records = [item for item in batch if isinstance(item, AttemptRecord)]
    now = utcnow()
    event_rows: dict[str, EventRow] = {}
    opened: dict[tuple[str, str], OpenedRow] = {}
    for item in new_events:
        event = item.event
        # Each event of the batch a microsecond after the one before: the order the worker
        # received them in stays the order of their times (ordered endpoints go by it).
        received = now + timedelta(microseconds=len(event_rows))
        if event["id"] not in event_rows:
            # The text it arrived in, if it did: the same JSON, without encoding it again.
            payload = json.dumps(event) if item.text is None else item.text
            event_rows[event["id"]] = (
                event["id"], event["organization_id"], event["type"], item.occurred_at, payload,
                received,
            )  # fmt: skip
        for webhook_id in item.webhook_ids:
            state: DeliveryState = "parked" if webhook_id in item.parked else "pending"
            opened.setdefault((event["id"], webhook_id), (event["id"], webhook_id, state, received))
    ended, started = failure_runs(records)
    advances = fold_advances(records)
    # A pending delivery whose event and attempt share the batch (a fast endpoint's attempt
    # often ends before its event's write begins) is written once: its advance inserts it in
    # its new state, with the created_at its event gives it, where opening then advancing it
    # would write two versions of the row and index both (the state changes, so the update
    # is not HOT). A parked one is opened as before: the opening parks it again.
    for i, row in enumerate(advances):
        first = opened.get(row[:2])
        if first is not None and first[2] == "pending":
            del opened[row[:2]]
            advances[i] = (*row[:5], first[3], row[6])
    return PreparedBatch(
        now=now,
        events=list(event_rows.values()),
        opened=list(opened.values()),
        attempts=[r.attempt for r in records],
        advances=advances,
        ended=ended,
        started=started,
    )


def fold_advances(records: Sequence[AttemptRecord]) -> list[AdvanceRow]:
    """One upsert row per delivery: ``succeeded`` if any attempt succeeded, else the last
    state; the highest attempt number; the last attempt's next time; created at the first
    attempt, updated at the last (only a delivery not yet in the table takes ``created_at``).
    """
    folded: dict[tuple[str, str], AdvanceRow] = {}
    for r in records:
        a = r.attempt
        key = (a.event_id, a.webhook_id)
        earlier = folded.get(key)
        if earlier is None:
            folded[key] = (a.event_id, a.webhook_id, r.delivery_state, a.attempt,
                           r.next_attempt_at, a.created_at, a.created_at)  # fmt: skip
            continue
        state: DeliveryState = (
            "succeeded" if "succeeded" in (earlier[2], r.delivery_state) else r.delivery_state
        )
        folded[key] = (a.event_id, a.webhook_id, state, max(earlier[3], a.attempt),
                       r.next_attempt_at, earlier[5], a.created_at)  # fmt: skip
    return list(folded.values())


def failure_runs(records: Sequence[AttemptRecord]) -> tuple[list[str], dict[str, datetime]]:
    """Endpoints whose failure run a batch ends (any success), and those it may start."""
    succeeded = {r.attempt.webhook_id for r in records if r.attempt.success}
    failed: dict[str, datetime] = {}
    for r in records:
        if not r.attempt.success and r.attempt.webhook_id not in succeeded:
            failed.setdefault(r.attempt.webhook_id, r.attempt.created_at)
    return sorted(succeeded), failed


class CorePipelineWrites:
    """:class:`PipelineWrites` in SQLAlchemy Core, on SQLite or PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgresql = engine.dialect.name == "postgresql"

    async def write_batch(self, batch: Sequence[NewEvent | AttemptRecord]) -> None:
        """See :meth:`PipelineWrites.write_batch`."""
        if not batch:
            return
        prepared = prepare(batch)
        async with self._engine.begin() as connection:
            # Events first: an attempt of the same batch then advances the delivery row the
            # event opened, and never the other way round.
            await self._insert_events(connection, prepared)
            await self._insert_attempts(connection, prepared)

    def _json_text(self) -> sa.ColumnElement[Any]:
        """The payload, JSON text already: bound as text, not encoded by the JSON type again."""
        text = sa.bindparam("payload_json", type_=sa.Text())
        # SQLite stores the text as it is; PostgreSQL's json column wants its own type.
        return sa.cast(text, sa.JSON) if self._postgresql else text

    def _insert(self, table: sa.Table) -> Any:  # noqa: ANN401 - a dialect-specific Insert
        return (postgresql.insert if self._postgresql else sqlite.insert)(table)

    async def _insert_events(self, connection: AsyncConnection, prepared: PreparedBatch) -> None:
        if prepared.events:
            await connection.execute(
                self._insert(events).values(payload=self._json_text()).on_conflict_do_nothing(),
                [
                    {
                        "id": i,
                        "org_id": o,
                        "type": t,
                        "occurred_at": at,
                        "payload_json": p,
                        "received_at": r,
                    }
                    for i, o, t, at, p, r in prepared.events
                ],
            )
        if prepared.opened:
            await connection.execute(
                self._delivery_open(),
                [
                    {
                        "event_id": e,
                        "webhook_id": w,
                        "state": s,
                        "attempts": 0,
                        "next_attempt_at": c,
                        "created_at": c,
                        "updated_at": c,
                    }
                    for e, w, s, c in prepared.opened
                ],
            )

    async def _insert_attempts(self, connection: AsyncConnection, prepared: PreparedBatch) -> None:
        if not prepared.attempts:
            return
        await connection.execute(
            attempts.insert(),
            [{c: getattr(a, c) for c in ATTEMPT_COLUMNS} for a in prepared.attempts],
        )
        # One upsert for the whole batch (executemany), not two statements per attempt.
        columns = ("event_id", "webhook_id", "state", "attempts", "next_attempt_at",
                   "created_at", "updated_at")  # fmt: skip
        await connection.execute(
            self._delivery_upsert(),
            [dict(zip(columns, row, strict=True)) for row in prepared.advances],
        )
        if prepared.ended:
            await connection.execute(
                webhooks.update()
                .where(webhooks.c.id.in_(prepared.ended), webhooks.c.failing_since.is_not(None))
                .values(failing_since=None)
            )
        if prepared.started:
            await connection.execute(
                webhooks.update()
                .where(webhooks.c.id == sa.bindparam("run_id"), webhooks.c.failing_since.is_(None))
                .values(failing_since=sa.bindparam("run_since")),
                [{"run_id": w, "run_since": since} for w, since in prepared.started.items()],
            )

    def _delivery_open(self) -> Any:  # noqa: ANN401 - a dialect-specific Insert
        """Open a delivery; one already there is left alone, unless it is ``pending`` and
        this write parks it (see :meth:`PipelineWrites.write_batch`)."""
        statement = self._insert(deliveries)
        return statement.on_conflict_do_update(
            index_elements=[deliveries.c.event_id, deliveries.c.webhook_id],
            set_={
                "state": statement.excluded.state,
                "next_attempt_at": statement.excluded.next_attempt_at,
                "updated_at": statement.excluded.updated_at,
            },
            where=sa.and_(statement.excluded.state == "parked", deliveries.c.state == "pending"),
        )

    def _delivery_upsert(self) -> Any:  # noqa: ANN401 - a dialect-specific Insert
        """Insert or advance a delivery. A succeeded delivery stays succeeded: a late duplicate
        of an earlier attempt must not reopen it."""
        statement = self._insert(deliveries)
        # max() of two values is a scalar function on SQLite, an aggregate on PostgreSQL.
        larger = sa.func.greatest if self._postgresql else sa.func.max
        return statement.on_conflict_do_update(
            index_elements=[deliveries.c.event_id, deliveries.c.webhook_id],
            set_={
                "state": sa.case(
                    (deliveries.c.state == "succeeded", deliveries.c.state),
                    else_=statement.excluded.state,
                ),
                "attempts": larger(deliveries.c.attempts, statement.excluded.attempts),
                "next_attempt_at": statement.excluded.next_attempt_at,
                "updated_at": statement.excluded.updated_at,
            },
        )
