"""``queries``: the find-and-search calls of the API over a large store, on PostgreSQL.

The store is filled to ``--query-attempts`` (1,000,000) attempts over 1,000 endpoints (100
organizations of 10, every event fanned out to its organization's 10), spread over the last
7 days, 5 % of them failed — written straight into the tables with ``COPY``, as the pipeline
would have left them. Then a ``python -m worker.cli api`` process answers, one request at a
time, each of:

- ``GET /events/{id}`` of a random event;
- ``GET /webhooks/{id}/deliveries?event_id=…``;
- ``GET /webhooks/{id}/deliveries?since=…&until=…`` over a random hour;
- ``GET /webhooks/{id}/stats`` (the last 24 h);

and the figure is each one's p95 over the requests, measured at the client (HTTP included).
Beside it, each call's SQL as the store issues it, with PostgreSQL's ``EXPLAIN ANALYZE``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import sqlalchemy as sa

from bench.harness import Bench, Outcome, percentile
from bench.procs import free_port, run_worker
from bench.serve import Serve, create_token
from schemas.events import EVENT_TYPES
from worker.store.ids import new_id

ENDPOINTS_PER_ORG = 10
DAYS = 7
FAILED_SHARE = 0.05
COPY_CHUNK = 50_000
TOKENS = 10  # at most, organizations whose tokens make the requests
WARM_UP_REQUESTS = 20
TARGET_P95_MS = 50


def _org(index: int) -> str:
    return f"org_bench_q{index:03d}"


def _rows(
    events_count: int, endpoints: dict[str, list[str]], now: datetime
) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """Events, deliveries and attempts, a chunk of events at a time, oldest first."""
    rng = random.Random(7)
    span_ms = DAYS * 86_400_000
    start = now - timedelta(days=DAYS)
    orgs = list(endpoints)
    chunk = COPY_CHUNK // ENDPOINTS_PER_ORG
    for first in range(0, events_count, chunk):
        event_rows, delivery_rows, attempt_rows = [], [], []
        for n in range(first, min(first + chunk, events_count)):
            offset_ms = span_ms * n // events_count
            received = start + timedelta(milliseconds=offset_ms)
            org = orgs[n % len(orgs)]
            event_type = EVENT_TYPES[n % len(EVENT_TYPES)]
            event_id = f"evt_q{n:010d}"
            payload = (
                f'{{"id":"{event_id}","type":"{event_type}","organization_id":"{org}",'
                f'"occurred_at":"{received.isoformat()}","data":{{"n":{n}}}}}'
            )
            event_rows.append((event_id, org, event_type, received, payload, received))
            for webhook_id in endpoints[org]:
                ok = rng.random() >= FAILED_SHARE
                at = received + timedelta(milliseconds=rng.randint(5, 400))
                delivery_rows.append(
                    (event_id, webhook_id, "succeeded" if ok else "failed", 1, at, at, at)
                )
                attempt_id = new_id("att", now_ms=int(at.timestamp() * 1000))
                attempt_rows.append((
                    attempt_id, webhook_id, org, event_id, event_type, 1, ok,
                    200 if ok else 500, None if ok else "http_status",
                    None if ok else "HTTP 500", rng.randint(3, 300), "ok" if ok else "error", at,
                ))  # fmt: skip
        yield event_rows, delivery_rows, attempt_rows


EVENT_COLUMNS = ("id", "org_id", "type", "occurred_at", "payload", "received_at")
DELIVERY_COLUMNS = (
    "event_id", "webhook_id", "state", "attempts", "next_attempt_at", "created_at", "updated_at"
)  # fmt: skip
ATTEMPT_COLUMNS = (
    "id", "webhook_id", "org_id", "event_id", "event_type", "attempt", "success", "status_code",
    "error_kind", "error_message", "duration_ms", "response_body", "created_at",
)  # fmt: skip


async def _fill(
    bench: Bench, endpoints: dict[str, list[str]], attempts_count: int, now: datetime
) -> None:
    say = bench.say("queries")
    events_count = attempts_count // ENDPOINTS_PER_ORG
    async with bench.store.engine.connect() as pooled:
        raw = await pooled.get_raw_connection()
        connection: Any = raw.driver_connection  # an asyncpg.Connection; asyncpg has no hints
        written = 0
        for event_rows, delivery_rows, attempt_rows in _rows(events_count, endpoints, now):
            await connection.copy_records_to_table(
                "events", records=event_rows, columns=EVENT_COLUMNS
            )
            await connection.copy_records_to_table(
                "deliveries", records=delivery_rows, columns=DELIVERY_COLUMNS
            )
            await connection.copy_records_to_table(
                "attempts", records=attempt_rows, columns=ATTEMPT_COLUMNS
            )
            written += len(attempt_rows)
            say(f"{written}/{attempts_count} attempts written")
        await connection.execute("ANALYZE events; ANALYZE deliveries; ANALYZE attempts")


Request = Callable[[random.Random], tuple[str, str]]  # -> (org, path)


def _requests(
    endpoints: dict[str, list[str]], events_count: int, now: datetime
) -> dict[str, Request]:
    orgs = list(endpoints)[:TOKENS]

    def event_of(rng: random.Random, org_index: int) -> str:
        # Events are dealt round-robin to the organizations: this one's are n ≡ index.
        n = rng.randrange(org_index, events_count, len(endpoints))
        return f"evt_q{n:010d}"

    def event(rng: random.Random) -> tuple[str, str]:
        index = rng.randrange(len(orgs))
        return orgs[index], f"/events/{event_of(rng, index)}"

    def by_event(rng: random.Random) -> tuple[str, str]:
        index = rng.randrange(len(orgs))
        webhook = rng.choice(endpoints[orgs[index]])
        return orgs[index], f"/webhooks/{webhook}/deliveries?event_id={event_of(rng, index)}"

    def window(rng: random.Random) -> tuple[str, str]:
        org = rng.choice(orgs)
        since = now - timedelta(seconds=rng.uniform(3600, DAYS * 86_400))
        until = since + timedelta(hours=1)
        query = f"since={_rfc3339(since)}&until={_rfc3339(until)}"
        return org, f"/webhooks/{rng.choice(endpoints[org])}/deliveries?{query}"

    def stats(rng: random.Random) -> tuple[str, str]:
        org = rng.choice(orgs)
        return org, f"/webhooks/{rng.choice(endpoints[org])}/stats"

    return {
        "GET /events/{id}": event,
        "GET /webhooks/{id}/deliveries?event_id": by_event,
        "GET /webhooks/{id}/deliveries?since&until": window,
        "GET /webhooks/{id}/stats": stats,
    }


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _time_requests(
    serve: Serve, tokens: dict[str, str], request: Request, count: int
) -> tuple[list[float], dict[int, int]]:
    rng = random.Random(11)
    durations: list[float] = []
    statuses: dict[int, int] = {}
    for index in range(WARM_UP_REQUESTS + count):
        org, path = request(rng)
        started = time.perf_counter()
        async with serve.http.get(
            f"{serve.api_url}/api/v2{path}", headers={"Authorization": f"Bearer {tokens[org]}"}
        ) as response:
            await response.read()
        if index >= WARM_UP_REQUESTS:
            durations.append((time.perf_counter() - started) * 1000)
            statuses[response.status] = statuses.get(response.status, 0) + 1
    return sorted(durations), statuses


async def _plans(
    bench: Bench, calls: dict[str, Callable[[], Awaitable[object]]]
) -> dict[str, list[str]]:
    """Each call's statements as the store issues them, with ``EXPLAIN ANALYZE`` of each."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:  # noqa: ANN401
        statements.append((statement, parameters))

    engine = bench.store.engine
    plans: dict[str, list[str]] = {}
    for name, call in calls.items():
        statements.clear()
        sa.event.listen(engine.sync_engine, "before_cursor_execute", capture)
        try:
            await call()
        finally:
            sa.event.remove(engine.sync_engine, "before_cursor_execute", capture)
        found = [s for s in statements if s[0].lstrip().upper().startswith("SELECT")]
        lines: list[str] = []
        async with engine.connect() as connection:
            for statement, parameters in found:
                result = await connection.exec_driver_sql(
                    f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters
                )
                lines.append(" ".join(statement.split()))
                lines.extend(f"  {row[0]}" for row in result)
        plans[name] = lines
    return plans


async def queries(bench: Bench, _done: dict[str, Outcome]) -> Outcome:
    outcome = Outcome("queries")
    say = bench.say("queries")
    sizes = bench.sizes
    await bench.reset()
    orgs = [_org(i) for i in range(sizes.query_endpoints // ENDPOINTS_PER_ORG)]
    seeded = await bench.seed(
        [
            (org, f"/q/{org}/{j}", list(EVENT_TYPES))
            for org in orgs
            for j in range(ENDPOINTS_PER_ORG)
        ],
        say,
    )
    endpoints = {
        org: seeded[i * ENDPOINTS_PER_ORG : (i + 1) * ENDPOINTS_PER_ORG]
        for i, org in enumerate(orgs)
    }
    now = datetime.now(UTC)
    started = time.monotonic()
    await _fill(bench, endpoints, sizes.query_attempts, now)
    say(f"store filled in {time.monotonic() - started:.0f}s")
    events_count = sizes.query_attempts // ENDPOINTS_PER_ORG
    log = bench.log_dir / "api-queries.log"
    tokens = {org: await create_token(bench.service_settings(), org, log) for org in orgs[:TOKENS]}
    port = free_port()
    settings = {**bench.service_settings(), "API_PORT": str(port), **bench.worker_settings}
    requests = _requests(endpoints, events_count, now)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        process = await stack.enter_async_context(run_worker(settings, log, "api"))
        serve = Serve(process, f"http://127.0.0.1:{port}", http)
        await serve.wait_ready()
        for name, request in requests.items():
            durations, statuses = await _time_requests(serve, tokens, request, sizes.query_requests)
            outcome.add(f"{name} p95", percentile(durations, 95), "ms", at_most=TARGET_P95_MS)
            outcome.details[name] = {
                "p50_ms": percentile(durations, 50),
                "p95_ms": percentile(durations, 95),
                "max_ms": durations[-1] if durations else None,
                "statuses": statuses,
            }
            say(f"{name}: p95 {percentile(durations, 95):.1f} ms, statuses {statuses}")
    rng = random.Random(3)
    org = orgs[0]
    webhook = endpoints[org][0]
    event_id = f"evt_q{rng.randrange(0, events_count, len(orgs)):010d}"
    window_start = now - timedelta(days=3)
    store = bench.store
    outcome.details["plans"] = await _plans(
        bench,
        {
            "GET /events/{id}": lambda: asyncio.gather(
                store.events.get_for_org(org, event_id), store.events.deliveries_of(org, event_id)
            ),
            "GET /webhooks/{id}/deliveries?event_id": lambda: store.attempts.list(
                webhook, 50, None, event_id=event_id
            ),
            "GET /webhooks/{id}/deliveries?since&until": lambda: store.attempts.list(
                webhook, 50, None, since=window_start, until=window_start + timedelta(hours=1)
            ),
            "GET /webhooks/{id}/stats": lambda: store.stats.endpoint(
                webhook, now - timedelta(days=1), now
            ),
        },
    )
    plans = bench.log_dir / "queries-plans.txt"
    plans.write_text(
        "\n\n".join(
            f"== {name}\n" + "\n".join(lines) for name, lines in outcome.details["plans"].items()
        )
    )
    outcome.notes.append(
        f"{sizes.query_attempts} attempts over {sizes.query_endpoints} endpoints on "
        f"PostgreSQL, {DAYS} days, {FAILED_SHARE:.0%} failed; {sizes.query_requests} requests "
        f"per call, one at a time, after {WARM_UP_REQUESTS} warm-up requests, timed at the "
        f"client; EXPLAIN ANALYZE of each call's statements in details.plans and {plans}"
    )
    await bench.reset()
    return outcome
