"""The pipeline's batch write on PostgreSQL, through asyncpg directly.

Each table gets one statement per batch, its rows passed as one array per column and spread
by ``unnest``: the server parses and plans it once, asyncpg encodes the arrays in C, and no
per-row SQL expression is built. Attempts, only ever inserted, go by ``COPY`` instead. This is
the worker's hottest write; SQLAlchemy Core costed more CPU than the rest of a delivery's
bookkeeping together.

The rows come from :func:`worker.store.pipeline_writes.prepare`, as for the Core
implementation; only the statements differ, and they do what the Core ones do: events are
inserted if new, deliveries if new or else parked where a pending one is parked again,
attempts always, and a delivery advances without ever leaving ``succeeded``.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.pipeline_writes import ATTEMPT_COLUMNS, PreparedBatch, prepare
from worker.store.records import AttemptRecord, NewEvent

INSERT_EVENTS = """
INSERT INTO events (id, org_id, type, occurred_at, payload, received_at)
SELECT i, o, t, at, p, r
FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::timestamptz[], $5::json[],
            $6::timestamptz[]) AS e(i, o, t, at, p, r)
ON CONFLICT DO NOTHING
"""

OPEN_DELIVERIES = """
INSERT INTO deliveries AS d (event_id, webhook_id, state, attempts, next_attempt_at,
                             created_at, updated_at)
SELECT e, w, s, 0, c, c, c
FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::timestamptz[]) AS o(e, w, s, c)
ON CONFLICT (event_id, webhook_id) DO UPDATE SET
    state = excluded.state,
    next_attempt_at = excluded.next_attempt_at,
    updated_at = excluded.updated_at
WHERE excluded.state = 'parked' AND d.state = 'pending'
"""

ADVANCE_DELIVERIES = """
INSERT INTO deliveries AS d (event_id, webhook_id, state, attempts, next_attempt_at,
                             created_at, updated_at)
SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::int[],
                     $5::timestamptz[], $6::timestamptz[], $7::timestamptz[])
ON CONFLICT (event_id, webhook_id) DO UPDATE SET
    state = CASE WHEN d.state = 'succeeded' THEN d.state ELSE excluded.state END,
    attempts = greatest(d.attempts, excluded.attempts),
    next_attempt_at = excluded.next_attempt_at,
    updated_at = excluded.updated_at
"""

END_FAILURE_RUNS = """
UPDATE webhooks SET failing_since = NULL
WHERE id = ANY($1::varchar[]) AND failing_since IS NOT NULL
"""

START_FAILURE_RUNS = """
UPDATE webhooks SET failing_since = f.since
FROM unnest($1::varchar[], $2::timestamptz[]) AS f(id, since)
WHERE webhooks.id = f.id AND webhooks.failing_since IS NULL
"""


# An attempt's fields in the table's column order, as one tuple.
_attempt_row = attrgetter(*ATTEMPT_COLUMNS)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as one list per column, the form ``unnest`` takes."""
    return [[row[i] for row in rows] for i in range(width)]


class AsyncpgPipelineWrites:
    """:class:`~worker.store.pipeline_writes.PipelineWrites` in asyncpg, on PostgreSQL only.

    Connections come from the engine's pool; the transaction is asyncpg's own.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def write_batch(self, batch: Sequence[NewEvent | AttemptRecord]) -> None:
        """See :meth:`worker.store.pipeline_writes.PipelineWrites.write_batch`."""
        if not batch:
            return
        prepared = prepare(batch)
        async with self._engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection  # an asyncpg.Connection; asyncpg has no hints
            async with driver.transaction():
                await _write(driver, prepared)


async def _write(connection: Any, prepared: PreparedBatch) -> None:  # noqa: ANN401 - asyncpg
    if prepared.events:
        await connection.execute(INSERT_EVENTS, *_columns(prepared.events, 6))
    if prepared.opened:
        await connection.execute(OPEN_DELIVERIES, *_columns(prepared.opened, 4))
    if prepared.attempts:
        # Attempts are only ever inserted, so COPY takes them: rows encoded as rows, where
        # array parameters cost a check per element (twice the client CPU at 50 attempts).
        rows = [_attempt_row(a) for a in prepared.attempts]
        await connection.copy_records_to_table("attempts", records=rows, columns=ATTEMPT_COLUMNS)
        await connection.execute(ADVANCE_DELIVERIES, *_columns(prepared.advances, 7))
    if prepared.ended:
        await connection.execute(END_FAILURE_RUNS, prepared.ended)
    if prepared.started:
        started = prepared.started
        await connection.execute(START_FAILURE_RUNS, list(started), list(started.values()))
