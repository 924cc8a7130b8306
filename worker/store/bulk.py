"""The pipeline's hot statements on PostgreSQL, through asyncpg directly: the batch write,
and the endpoint read every delivery makes.

Each table gets one statement per batch, its rows passed as one array per column and spread
by ``unnest``: the server parses and plans it once, asyncpg encodes the arrays in C, and no
per-row SQL expression is built. This is the worker's hottest write; SQLAlchemy Core costed
more CPU than the rest of a delivery's bookkeeping together. SQLite keeps the Core path
(:meth:`worker.store.Store.write_batch`), and the tests run both.

The statements mirror the Core ones in :mod:`worker.store`: events and deliveries are
inserted if new, attempts always, and a delivery advances without ever leaving
``succeeded``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from worker.store.records import AttemptRecord, NewEvent, utcnow

INSERT_EVENTS = """
INSERT INTO events (id, org_id, type, occurred_at, payload, received_at)
SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::timestamptz[],
                     $5::json[], $6::timestamptz[])
ON CONFLICT DO NOTHING
"""

OPEN_DELIVERIES = """
INSERT INTO deliveries (event_id, webhook_id, state, attempts, next_attempt_at, created_at,
                        updated_at)
SELECT e, w, s, 0, $4::timestamptz, $4::timestamptz, $4::timestamptz
FROM unnest($1::varchar[], $2::varchar[], $3::varchar[]) AS d(e, w, s)
ON CONFLICT DO NOTHING
"""

INSERT_ATTEMPTS = """
INSERT INTO attempts (id, webhook_id, org_id, event_id, event_type, attempt, success,
                      status_code, error_kind, error_message, duration_ms, response_body,
                      created_at)
SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[],
                     $5::varchar[], $6::int[], $7::bool[], $8::int[], $9::varchar[],
                     $10::varchar[], $11::int[], $12::text[], $13::timestamptz[])
"""

ADVANCE_DELIVERIES = """
INSERT INTO deliveries AS d (event_id, webhook_id, state, attempts, next_attempt_at,
                             created_at, updated_at)
SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[], $4::int[],
                     $5::timestamptz[], $6::timestamptz[], $6::timestamptz[])
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


READ_WEBHOOKS = """
SELECT id, org_id, url, events, enabled, description, secret, previous_secret,
       previous_secret_expires_at, created_at, updated_at, disabled_reason, failing_since
FROM webhooks WHERE id = ANY($1::varchar[])
"""


async def read_webhooks(
    connection: Any,  # noqa: ANN401 - an asyncpg.Connection; asyncpg ships no type hints
    webhook_ids: list[str],
) -> list[Any]:
    """The rows of these endpoints (asyncpg records, read by column name)."""
    return list(await connection.fetch(READ_WEBHOOKS, webhook_ids))


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)] if rows else [[]] * width


def _advances(records: Sequence[AttemptRecord]) -> list[tuple[Any, ...]]:
    """One row per delivery: an upsert may not touch a row twice in one statement, so several
    attempts of one delivery in a batch (a redelivered duplicate) are folded as consecutive
    upserts would leave them."""
    folded: dict[tuple[str, str], tuple[Any, ...]] = {}
    for r in records:
        a = r.attempt
        key = (a.event_id, a.webhook_id)
        row = (a.event_id, a.webhook_id, r.delivery_state, a.attempt, r.next_attempt_at,
               a.created_at)  # fmt: skip
        earlier = folded.get(key)
        if earlier is not None:
            state = "succeeded" if "succeeded" in (earlier[2], row[2]) else row[2]
            row = (*row[:2], state, max(earlier[3], row[3]), *row[4:])
        folded[key] = row
    return list(folded.values())


def failure_runs(records: Sequence[AttemptRecord]) -> tuple[list[str], dict[str, datetime]]:
    """Endpoints whose failure run a batch ends (any success), and those it may start."""
    succeeded = {r.attempt.webhook_id for r in records if r.attempt.success}
    failed: dict[str, datetime] = {}
    for r in records:
        if not r.attempt.success and r.attempt.webhook_id not in succeeded:
            failed.setdefault(r.attempt.webhook_id, r.attempt.created_at)
    return sorted(succeeded), failed


async def write_batch(
    connection: Any,  # noqa: ANN401 - an asyncpg.Connection; asyncpg ships no type hints
    new_events: Sequence[NewEvent],
    records: Sequence[AttemptRecord],
) -> None:
    """Write a batch in one transaction on ``connection``."""
    async with connection.transaction():
        if new_events:
            now = utcnow()
            event_rows = [
                (
                    e.event["id"],
                    e.event["organization_id"],
                    e.event["type"],
                    e.occurred_at,
                    json.dumps(e.event),
                    now,
                )
                for e in new_events
            ]
            await connection.execute(INSERT_EVENTS, *_columns(event_rows, 6))
            opened = [
                (e.event["id"], w, "parked" if w in e.parked else "pending")
                for e in new_events
                for w in e.webhook_ids
            ]
            if opened:
                await connection.execute(OPEN_DELIVERIES, *_columns(opened, 3), now)
        if records:
            attempt_rows = [
                (
                    a.id,
                    a.webhook_id,
                    a.org_id,
                    a.event_id,
                    a.event_type,
                    a.attempt,
                    a.success,
                    a.status_code,
                    a.error_kind,
                    a.error_message,
                    a.duration_ms,
                    a.response_body,
                    a.created_at,
                )
                for a in (r.attempt for r in records)
            ]
            await connection.execute(INSERT_ATTEMPTS, *_columns(attempt_rows, 13))
            await connection.execute(ADVANCE_DELIVERIES, *_columns(_advances(records), 6))
            ended, started = failure_runs(records)
            if ended:
                await connection.execute(END_FAILURE_RUNS, ended)
            if started:
                await connection.execute(START_FAILURE_RUNS, list(started), list(started.values()))
