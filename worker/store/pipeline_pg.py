"""The pipeline's batch write on PostgreSQL, through asyncpg directly: one statement a batch.

Every table's rows go in as one array per column, spread by ``unnest``, and the parts are the
data-modifying ``WITH`` clauses of a single statement: one round trip a batch, atomic without
a ``BEGIN`` and ``COMMIT`` of its own, parsed and planned once per connection. A batch of
separate statements in a transaction took seven round trips; at a few hundred events a second
the batches hold a delivery or two, and those round trips were most of a delivery's cost.

The rows come from :func:`worker.store.pipeline_writes.prepare`, as for the Core
implementation, and the statement does what the Core one does in turn: events are inserted if
new, deliveries if new or else parked where a pending one is parked again, attempts always,
and a delivery advances without ever leaving ``succeeded``. The clauses of one statement do
not see each other's rows, so none may touch a row another touches: a delivery the batch both
opens and advances is folded into its advance first (:func:`fold_opened`), and the failure
runs a batch ends and those it starts are of different endpoints by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.database import driver_connection
from worker.store.pipeline_writes import AdvanceRow, OpenedRow, PreparedBatch, prepare
from worker.store.records import AttemptRecord, NewEvent

WRITE_BATCH = """
WITH new_events AS (
    INSERT INTO events (id, org_id, type, occurred_at, payload, received_at)
    SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::timestamptz[],
                         $5::json[], $6::timestamptz[])
    ON CONFLICT DO NOTHING
), opened AS (
    INSERT INTO deliveries AS d (event_id, webhook_id, state, attempts, next_attempt_at,
                                 created_at, updated_at)
    SELECT e, w, s, 0, c, c, c
    FROM unnest($7::varchar[], $8::varchar[], $9::varchar[], $10::timestamptz[]) AS o(e, w, s, c)
    ON CONFLICT (event_id, webhook_id) DO UPDATE SET
        state = excluded.state,
        next_attempt_at = excluded.next_attempt_at,
        updated_at = excluded.updated_at
    WHERE excluded.state = 'parked' AND d.state = 'pending'
), new_attempts AS (
    INSERT INTO attempts (id, webhook_id, org_id, event_id, event_type, attempt, success,
                          status_code, error_kind, error_message, duration_ms, response_body,
                          created_at)
    SELECT * FROM unnest($11::varchar[], $12::varchar[], $13::varchar[], $14::varchar[],
                         $15::varchar[], $16::int[], $17::bool[], $18::int[], $19::varchar[],
                         $20::varchar[], $21::int[], $22::text[], $23::timestamptz[])
), advanced AS (
    INSERT INTO deliveries AS d (event_id, webhook_id, state, attempts, next_attempt_at,
                                 created_at, updated_at)
    SELECT * FROM unnest($24::varchar[], $25::varchar[], $26::varchar[], $27::int[],
                         $28::timestamptz[], $29::timestamptz[], $30::timestamptz[])
    ON CONFLICT (event_id, webhook_id) DO UPDATE SET
        state = CASE WHEN d.state = 'succeeded' THEN d.state ELSE excluded.state END,
        attempts = greatest(d.attempts, excluded.attempts),
        next_attempt_at = excluded.next_attempt_at,
        updated_at = excluded.updated_at
), ended AS (
    UPDATE webhooks SET failing_since = NULL
    WHERE id = ANY($31::varchar[]) AND failing_since IS NOT NULL
), started AS (
    UPDATE webhooks SET failing_since = f.since
    FROM unnest($32::varchar[], $33::timestamptz[]) AS f(id, since)
    WHERE webhooks.id = f.id AND webhooks.failing_since IS NULL
)
SELECT 1
"""


def fold_opened(
    opened: Sequence[OpenedRow], advances: Sequence[AdvanceRow]
) -> tuple[list[OpenedRow], list[AdvanceRow]]:
    """Opened deliveries that the batch also advances, folded into their advance.

    Opening and then advancing leaves what advancing alone leaves, but for ``created_at``,
    which the opening sets (its event's arrival) and an advance never changes: the folded
    advance carries it. What opening a delivery that exists already may change (parking a
    pending one), the advance that follows changes again. A row with no advance is kept.
    """
    by_key = {(row[0], row[1]): row for row in opened}
    if not by_key or not advances:
        return list(opened), list(advances)
    folded: list[AdvanceRow] = []
    for advance in advances:
        opening = by_key.pop((advance[0], advance[1]), None)
        if opening is None:
            folded.append(advance)
        else:
            event_id, webhook_id, state, attempts, next_at, _, updated = advance
            folded.append((event_id, webhook_id, state, attempts, next_at, opening[3], updated))
    return list(by_key.values()), folded


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as one list per column, the form ``unnest`` takes."""
    return [[row[i] for row in rows] for i in range(width)]


class AsyncpgPipelineWrites:
    """:class:`~worker.store.pipeline_writes.PipelineWrites` in asyncpg, on PostgreSQL only.

    Connections come from the engine's pool.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def write_batch(self, batch: Sequence[NewEvent | AttemptRecord]) -> None:
        """See :meth:`worker.store.pipeline_writes.PipelineWrites.write_batch`."""
        if not batch:
            return
        arguments = _arguments(prepare(batch))
        async with driver_connection(self._engine) as connection:
            await connection.execute(WRITE_BATCH, *arguments)


def _arguments(prepared: PreparedBatch) -> list[list[Any]]:
    """The statement's 33 parameters: each part's columns, empty lists for a part with none."""
    opened, advances = fold_opened(prepared.opened, prepared.advances)
    attempts = [
        (a.id, a.webhook_id, a.org_id, a.event_id, a.event_type, a.attempt, a.success,
         a.status_code, a.error_kind, a.error_message, a.duration_ms, a.response_body,
         a.created_at)
        for a in prepared.attempts
    ]  # fmt: skip
    started = prepared.started
    return [
        *_columns(prepared.events, 6),
        *_columns(opened, 4),
        *_columns(attempts, 13),
        *_columns(advances, 7),
        list(prepared.ended),
        list(started),
        list(started.values()),
    ]
