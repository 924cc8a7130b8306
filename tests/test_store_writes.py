"""The pipeline's batch write and the parked-delivery lease, on both databases.

One sequence of batches is written through each implementation of
:class:`~worker.store.pipeline_writes.PipelineWrites` — Core on SQLite, Core on PostgreSQL,
asyncpg on PostgreSQL — and must leave the same rows: the asyncpg statements are a second
implementation of the Core ones, and this is what keeps them one behaviour.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import TEST_SECRET_KEY
from worker.store import Store, database, pipeline_writes
from worker.store.crypto import SecretBox
from worker.store.pipeline_pg import AsyncpgPipelineWrites
from worker.store.pipeline_writes import CorePipelineWrites, PipelineWrites
from worker.store.records import Attempt, AttemptRecord, DeliveryState, NewEvent, utcnow
from worker.store.tables import attempts, deliveries, events, webhooks

pytestmark = pytest.mark.timeout(60)

# The clock of the writes (received_at, and the timestamps of the deliveries an event opens),
# fixed so that rows written at different times by different implementations compare equal.
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
Batch = list[NewEvent | AttemptRecord]


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Scenario:
    """Ids of one run, tagged so that runs sharing a database never see each other's rows."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(5)
        self.org = f"org_{self.tag}"
        self.attempt_count = 0

    def wh(self, name: str) -> str:
        return f"wh_{name}_{self.tag}"

    def evt(self, name: str) -> str:
        return f"evt_{name}_{self.tag}"

    def event(self, name: str, *, to: Sequence[str], parked: Sequence[str] = ()) -> NewEvent:
        envelope = {
            "id": self.evt(name),
            "type": "order.created",
            "organization_id": self.org,
            "occurred_at": T0.isoformat(),
            "data": {"order": name, "lines": [1, 2]},
        }
        return NewEvent(
            envelope, T0, tuple(self.wh(w) for w in to), frozenset(self.wh(w) for w in parked)
        )

    def attempt(
        self,
        event: str,
        webhook: str,
        number: int,
        at: float,
        state: DeliveryState,
        retry_in: float | None = None,
    ) -> AttemptRecord:
        self.attempt_count += 1
        success = state == "succeeded"
        return AttemptRecord(
            Attempt(
                id=f"att_{self.attempt_count:03}_{self.tag}",
                webhook_id=self.wh(webhook),
                org_id=self.org,
                event_id=self.evt(event),
                event_type="order.created",
                attempt=number,
                success=success,
                status_code=200 if success else 503,
                error_kind=None if success else "http_status",
                error_message=None if success else "HTTP 503",
                duration_ms=17,
                response_body="ok" if success else "busy",
                created_at=_at(at),
            ),
            state,
            None if retry_in is None else _at(at + retry_in),
        )

    def batches(self) -> list[Batch]:
        a = self.attempt
        return [
            # Events: one with a pending and a parked delivery, one given twice in the batch.
            [
                self.event("1", to=["A", "B"], parked=["B"]),
                self.event("2", to=["A"]),
                self.event("3", to=["C"]),
                self.event("4", to=["D", "F"]),
                self.event("6", to=["F"]),
                self.event("2", to=["A"]),
            ],
            # The same events again (a redelivered message): nothing changes.
            [self.event("1", to=["A", "B"], parked=["B"]), self.event("3", to=["C"])],
            [
                a("1", "A", 1, 1, "succeeded"),
                a("2", "A", 1, 2, "pending", retry_in=30),  # retryable: a run would start...
                a("3", "C", 1, 3, "pending", retry_in=30),  # starts C's run
                a("4", "D", 1, 4, "succeeded"),  # ends D's run, open since before
                a("4", "F", 1, 5, "pending", retry_in=30),  # starts F's run
            ],  # ...but A also succeeded in this batch, so A's run does not start
            [
                a("2", "A", 2, 40, "succeeded"),
                a("3", "C", 2, 41, "failed"),  # final failure: C's run goes on from 3 s
                a("4", "F", 2, 42, "succeeded"),  # ends F's run
                # Two attempts of one delivery in a batch, of an event never stored (a test
                # send): folded, created at the first, succeeded, attempt 2.
                a("5", "E", 1, 43, "pending", retry_in=1),
                a("5", "E", 2, 44, "succeeded"),
            ],
            [
                # A late duplicate of attempt 1 after the success: the delivery stays
                # succeeded at attempt 2 (the failure still starts a run, as any failure does).
                a("2", "A", 1, 50, "pending", retry_in=30),
                a("6", "F", 1, 51, "pending", retry_in=30),  # F fails again: a new run
            ],
            # An event and its first attempt in one batch (a fast endpoint's attempt can be
            # recorded with the event it came from): the delivery is opened and advanced.
            [self.event("7", to=["E"]), a("7", "E", 1, 60, "succeeded")],
            [self.event("8", to=["A", "C", "D"])],
            [a("8", "C", 1, 70, "pending", retry_in=30), a("8", "D", 1, 71, "succeeded")],
            # Redelivered, and parked this time by the scheduler: what is still pending is
            # parked (its attempt or retry may have been lost); nothing else changes.
            [
                self.event("8", to=["A", "C", "D"], parked=["A", "C", "D"]),
                self.event("1", to=["A", "B"], parked=["A", "B"]),
            ],
        ]


async def _add_webhooks(engine: AsyncEngine, scenario: Scenario) -> None:
    rows = [
        {
            "id": scenario.wh(name),
            "org_id": scenario.org,
            "url": f"https://example.com/{name}",
            "events": ["order.created"],
            "enabled": True,
            "description": "",
            "secret": "whsec_unused",
            "created_at": T0,
            "updated_at": T0,
            "failing_since": _at(-86400) if name == "D" else None,
        }
        for name in "ABCDEF"
    ]
    async with engine.begin() as connection:
        await connection.execute(webhooks.insert(), rows)


def _normalised(rows: Sequence[sa.Row[Any]], tag: str) -> list[str]:
    """Rows as sorted JSON lines, datetimes in UTC and the run's tag masked."""

    def value(v: Any) -> Any:  # noqa: ANN401 - any column's value
        if isinstance(v, datetime):
            return v.astimezone(UTC).isoformat()
        return v

    lines = [
        json.dumps({k: value(v) for k, v in row._asdict().items()}, sort_keys=True) for row in rows
    ]
    return sorted(line.replace(tag, "TAG") for line in lines)


async def _snapshot(engine: AsyncEngine, scenario: Scenario) -> dict[str, list[str]]:
    mine = [scenario.wh(name) for name in "ABCDEF"]
    queries = {
        "events": sa.select(events).where(events.c.org_id == scenario.org),
        "deliveries": sa.select(deliveries).where(deliveries.c.webhook_id.in_(mine)),
        "attempts": sa.select(attempts).where(attempts.c.org_id == scenario.org),
        "webhooks": sa.select(webhooks.c.id, webhooks.c.failing_since).where(
            webhooks.c.org_id == scenario.org
        ),
    }
    async with engine.connect() as connection:
        return {
            name: _normalised((await connection.execute(query)).all(), scenario.tag)
            for name, query in queries.items()
        }


@asynccontextmanager
async def _engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = database.create_engine(url)
    try:
        await database.ensure_schema(engine, auto_migrate=True)
        yield engine
    finally:
        await engine.dispose()


async def _run(
    engine: AsyncEngine, make: Callable[[AsyncEngine], PipelineWrites]
) -> dict[str, list[str]]:
    scenario = Scenario()
    await _add_webhooks(engine, scenario)
    writes = make(engine)
    for batch in scenario.batches():
        await writes.write_batch(batch)
    return await _snapshot(engine, scenario)


def _row(lines: list[str], **match: Any) -> dict[str, Any]:  # noqa: ANN401
    found: list[dict[str, Any]] = [
        row for row in map(json.loads, lines) if match.items() <= row.items()
    ]
    assert len(found) == 1, (match, found)
    return found[0]


async def test_every_implementation_leaves_the_same_rows(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_writes, "utcnow", lambda: T0)
    async with _engine(f"sqlite+aiosqlite:///{tmp_path / 'writes.db'}") as sqlite:
        core_sqlite = await _run(sqlite, CorePipelineWrites)
    async with _engine(postgres_url) as postgres:
        core_postgres = await _run(postgres, CorePipelineWrites)
        asyncpg_postgres = await _run(postgres, AsyncpgPipelineWrites)

    for table in core_sqlite:
        assert core_postgres[table] == core_sqlite[table], f"{table}: Core on PostgreSQL"
        assert asyncpg_postgres[table] == core_sqlite[table], f"{table}: asyncpg"

    # And what they agree on is what the batches mean.
    rows = core_sqlite
    assert len(rows["events"]) == 7
    assert len(rows["attempts"]) == 15  # every attempt is kept, the duplicate too
    assert _row(rows["events"], id="evt_1_TAG")["payload"]["data"] == {
        "order": "1",
        "lines": [1, 2],
    }

    def received(event: str) -> str:
        at: str = _row(rows["events"], id=f"evt_{event}_TAG")["received_at"]
        return at

    # Events of one batch are a microsecond apart, in the order they were given: the order the
    # worker received them stays the order of their times (ordered endpoints go by it).
    assert received("1") == T0.isoformat()
    assert received("1") < received("2") < received("3")

    def delivery(event: str, webhook: str) -> tuple[str, int, str | None, str]:
        row = _row(rows["deliveries"], event_id=f"evt_{event}_TAG", webhook_id=f"wh_{webhook}_TAG")
        return row["state"], row["attempts"], row["next_attempt_at"], row["created_at"]

    assert len(rows["deliveries"]) == 12
    assert delivery("1", "A") == ("succeeded", 1, None, received("1"))
    assert delivery("1", "B") == ("parked", 0, received("1"), received("1"))
    assert delivery("2", "A")[:2] == ("succeeded", 2)  # not reopened by the late duplicate
    assert delivery("3", "C") == ("failed", 2, None, received("3"))
    assert delivery("5", "E") == ("succeeded", 2, None, _at(43).isoformat())
    assert delivery("4", "F") == ("succeeded", 2, None, received("4"))
    assert delivery("6", "F") == ("pending", 1, _at(81).isoformat(), received("6"))
    assert delivery("7", "E") == ("succeeded", 1, None, received("7"))
    assert delivery("8", "A") == ("parked", 0, received("8"), received("8"))
    assert delivery("8", "C") == ("parked", 1, received("8"), received("8"))  # retry: now
    assert delivery("8", "D") == ("succeeded", 1, None, received("8"))

    def failing_since(webhook: str) -> str | None:
        since: str | None = _row(rows["webhooks"], id=f"wh_{webhook}_TAG")["failing_since"]
        return since

    assert failing_since("A") == _at(50).isoformat()
    assert failing_since("B") is None
    assert failing_since("C") == _at(3).isoformat()
    assert failing_since("D") is None
    assert failing_since("E") is None
    assert failing_since("F") == _at(51).isoformat()


async def test_the_store_picks_asyncpg_on_postgresql_only(
    tmp_path: Path, postgres_url: str
) -> None:
    async with _engine(f"sqlite+aiosqlite:///{tmp_path / 'pick.db'}") as sqlite:
        assert isinstance(Store(sqlite).pipeline, CorePipelineWrites)
    async with _engine(postgres_url) as postgres:
        assert isinstance(Store(postgres).pipeline, AsyncpgPipelineWrites)


async def test_a_store_without_a_box_serves_tokens_but_not_endpoints(
    store: Store, org: str
) -> None:
    boxless = Store(store.engine)
    token, plaintext = await boxless.tokens.create(org, ["webhooks:manage"], "no box")
    assert (await boxless.tokens.authenticate(plaintext)) == token
    with pytest.raises(RuntimeError, match="no SecretBox"):
        await boxless.endpoints.create(
            org, "https://example.com/x", ["order.created"], "", enabled=True
        )
    with pytest.raises(RuntimeError, match="no SecretBox"):
        await boxless.secrets.reseal()
    assert (await store.endpoints.list(org, 10, None)).data == []  # nothing was written


# --- parked deliveries -------------------------------------------------------------------


async def _park(store: Store, org: str, count: int) -> tuple[str, list[str]]:
    """An endpoint with ``count`` parked deliveries, oldest first; its id and their events."""
    slow = await store.endpoints.create(
        org, "https://example.com/slow", ["order.created"], "", enabled=True
    )
    event_ids = [f"evt_park{i:02}_{secrets.token_hex(4)}" for i in range(count)]
    for i, event_id in enumerate(event_ids):  # one batch each: each one is older than the next
        envelope = {"id": event_id, "type": "order.created", "organization_id": org,
                    "occurred_at": T0.isoformat(), "data": {"n": i}}  # fmt: skip
        await store.pipeline.write_batch([NewEvent(envelope, T0, (slow.id,), frozenset({slow.id}))])
    return slow.id, event_ids


async def test_a_lease_keeps_parked_deliveries_parked_until_it_runs_out_or_is_handed_back(
    store: Store, org: str
) -> None:
    slow, event_ids = await _park(store, org, 4)
    assert (await store.parked.counts()).get(slow) == 4

    rows = await store.parked.lease(slow, 2, seconds=60)
    assert [event_id for event_id, _, _ in rows] == event_ids[:2]  # oldest first
    assert rows[1][1]["data"] == {"n": 1}  # the whole event, to build the attempt from
    assert rows[1][2] == 0  # no attempt yet: the next is attempt 1
    # Still parked, and counted so (a worker dying now leaves them there), but not leased again.
    assert await store.events.delivery_state(event_ids[0], slow) == "parked"
    assert (await store.parked.counts()).get(slow) == 4
    assert [e for e, _, _ in await store.parked.lease(slow, 10, seconds=60)] == event_ids[2:]
    assert await store.parked.lease(slow, 10, seconds=60) == []

    # Handed back: held ones are leased again once their time has come, skipped ones leave.
    await store.parked.hold(slow, [event_ids[0]], utcnow())
    await store.parked.hold(slow, [event_ids[1]], utcnow() + timedelta(hours=1))
    await store.parked.unpark(slow, [event_ids[2]])
    assert await store.events.delivery_state(event_ids[2], slow) == "pending"
    assert (await store.parked.counts()).get(slow) == 3
    assert [e for e, _, _ in await store.parked.lease(slow, 10, seconds=60)] == event_ids[:1]

    # A lease that ran out (its worker died) is taken again.
    gone, gone_ids = await _park(store, org, 2)
    assert len(await store.parked.lease(gone, 2, seconds=0.2)) == 2
    await asyncio.sleep(0.3)
    assert [e for e, _, _ in await store.parked.lease(gone, 2, seconds=60)] == gone_ids


async def test_concurrent_leases_never_get_the_same_row(postgres_url: str, org: str) -> None:
    async with _engine(postgres_url) as engine:
        store = Store(engine, SecretBox([TEST_SECRET_KEY]))
        slow, event_ids = await _park(store, org, 10)

        # Deterministically: a lease while another holds the rows it chose skips them.
        async with engine.begin() as connection:
            await connection.execute(
                sa.select(deliveries.c.event_id)
                .where(deliveries.c.event_id.in_(event_ids[:4]))
                .with_for_update()
            )
            second = await store.parked.lease(slow, 4, seconds=60)
        assert [e for e, _, _ in second] == event_ids[4:8]

        # And racing: however they interleave, no row is handed out twice.
        more, more_ids = await _park(store, org, 12)
        leased = await asyncio.gather(*(store.parked.lease(more, 4, seconds=60) for _ in range(4)))
        taken = [event_id for rows in leased for event_id, _, _ in rows]
        assert len(taken) == len(set(taken))
        assert set(taken) <= set(more_ids)


def _first(event_id: str, webhook_id: str, org: str, *, success: bool) -> AttemptRecord:
    """Attempt 1: a success, or a failure whose retry is due in a minute."""
    attempt = Attempt(
        id=f"att_{secrets.token_hex(6)}", webhook_id=webhook_id, org_id=org, event_id=event_id,
        event_type="order.created", attempt=1, success=success,
        status_code=200 if success else 503, error_kind=None if success else "http_status",
        error_message=None if success else "HTTP 503", duration_ms=17, response_body=None,
        created_at=utcnow(),
    )  # fmt: skip
    if success:
        return AttemptRecord(attempt, "succeeded", None)
    return AttemptRecord(attempt, "pending", utcnow() + timedelta(minutes=1))


async def test_a_task_that_comes_round_for_an_ordered_endpoint_parks_its_delivery(
    store: Store, org: str
) -> None:
    endpoint = await store.endpoints.create(
        org, "https://example.com/ordered", ["order.created"], "", enabled=True
    )
    event_ids = [f"evt_task{i}_{secrets.token_hex(4)}" for i in range(3)]
    for event_id in event_ids:
        envelope = {"id": event_id, "type": "order.created", "organization_id": org,
                    "occurred_at": T0.isoformat(), "data": {}}  # fmt: skip
        await store.pipeline.write_batch([NewEvent(envelope, T0, (endpoint.id,))])
    first, retried, done = event_ids
    await store.pipeline.write_batch(
        [
            _first(retried, endpoint.id, org, success=False),
            _first(done, endpoint.id, org, success=True),
        ]
    )

    # A queued first attempt, and a retry: each delivery joins the backlog as it stands, its
    # attempts (the lane makes the next) and its retry's time kept.
    assert await store.parked.park(endpoint.id, first, 1)
    assert await store.parked.park(endpoint.id, retried, 2)
    progress = await store.events.progress(retried)
    assert progress[endpoint.id] == ("parked", 1)
    assert await store.parked.count(endpoint.id) == 2
    # A duplicate of a task already parked, or of one whose delivery ended, has nothing to do.
    assert await store.parked.park(endpoint.id, retried, 2)
    assert await store.parked.park(endpoint.id, done, 2)
    assert await store.events.delivery_state(done, endpoint.id) == "succeeded"
    assert await store.parked.park(endpoint.id, "evt_never_stored", 1)

    # A sweep's retry that came round before the attempt it follows was recorded: parked now,
    # the record would make the delivery pending again, with nothing left to send it.
    swept, (leased,) = await _park(store, org, 1)
    assert len(await store.parked.lease(swept, 1, seconds=60)) == 1
    assert not await store.parked.park(swept, leased, 2)  # to come round again
    await store.pipeline.write_batch([_first(leased, swept, org, success=False)])
    assert await store.parked.park(swept, leased, 2)
    assert (await store.events.progress(leased))[swept] == ("parked", 1)
