"""Recoveries: the API calls, and the store's park_next, on both databases; and the schema
the migrations build, compared with the tables."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.conftest import Receiver, Service
from tests.test_events_api import _attempt, _events, _webhook
from worker.pipeline.recovery import RecoveryRunner
from worker.store import Store, recoveries
from worker.store.records import DeliveryState
from worker.store.tables import deliveries, metadata

pytestmark = pytest.mark.timeout(60)


async def _states(store: Store, webhook_id: str, event_ids: list[str]) -> list[DeliveryState]:
    return [await store.events.delivery_state(e, webhook_id) for e in event_ids]  # type: ignore[misc]


async def _scenario(service: Service, receiver: Receiver) -> tuple[str, list[str]]:
    """An endpoint with six deliveries, in this order of creation:

    0 failed (retries exhausted, 3 attempts), 1 pending between retries (2 failed attempts),
    2 succeeded after a failure, 3 fresh (pending, no attempt), 4 parked, 5 failed.
    """
    org, store = service.org, service.store
    webhook = await _webhook(service, receiver)
    ids = [(await _events(service, org, ["order.created"], (webhook,)))[0] for _ in range(4)]
    ids += await _events(service, org, ["order.created"], (webhook,), frozenset({webhook}))
    ids += await _events(service, org, ["order.created"], (webhook,))
    at = datetime.now(UTC)
    await store.pipeline.write_batch([
        *(_attempt(org, webhook, ids[0], number=n, success=False, at=at, state="pending")
          for n in (1, 2)),
        _attempt(org, webhook, ids[0], number=3, success=False, at=at, state="failed"),
        *(_attempt(org, webhook, ids[1], number=n, success=False, at=at) for n in (1, 2)),
        _attempt(org, webhook, ids[2], number=1, success=False, at=at),
        _attempt(org, webhook, ids[2], number=2, success=True, at=at),
        _attempt(org, webhook, ids[5], number=1, success=False, at=at, state="failed"),
    ])  # fmt: skip
    states = await _states(store, webhook, ids)
    assert states == ["failed", "pending", "succeeded", "pending", "parked", "failed"]
    return webhook, ids


# --- the store -------------------------------------------------------------------------------


@pytest.fixture
def runner_leaves_recoveries_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's recovery runner does nothing: these tests advance recoveries through the
    store themselves, and the runner, polling once a second, would move a batch of its own
    in between whenever a test takes longer than that (on a busy machine)."""

    async def idle(_runner: RecoveryRunner) -> int:
        return 0

    monkeypatch.setattr(RecoveryRunner, "step", idle)


@pytest.mark.usefixtures("runner_leaves_recoveries_alone")
async def test_park_next_moves_the_failed_ones_batch_by_batch_and_resumes(
    service: Service, receiver: Receiver
) -> None:
    store = service.store
    webhook, ids = await _scenario(service, receiver)
    since = datetime.now(UTC) - timedelta(hours=1)
    # Another endpoint's failed delivery is never taken.
    other = await _webhook(service, receiver)
    (foreign,) = await _events(service, service.org, ["order.created"], (other,))
    await store.pipeline.write_batch([
        _attempt(service.org, other, foreign, success=False, state="failed")
    ])  # fmt: skip

    recovery = await store.recoveries.create(service.org, webhook, since, None, "failed")
    assert recovery.id.startswith("rcv_")
    assert (recovery.state, recovery.total, recovery.queued) == ("running", 3, 0)
    assert recovery.until >= recovery.created_at - timedelta(seconds=1)
    assert recovery.id in [r.id for r in await store.recoveries.running()]

    assert await store.recoveries.park_next(recovery.id, 2) == 2
    assert await _states(store, webhook, ids) == [
        "parked", "parked", "succeeded", "pending", "parked", "failed",
    ]  # fmt: skip
    # The sweeper sends each as its next attempt: it gets the attempts so far, and a delivery
    # between retries is leased at once, whatever its next retry time.
    rows = await store.parked.lease(webhook, 2, seconds=60)
    assert [(e, n) for e, _, n in rows] == [(ids[0], 3), (ids[1], 2)]
    # Sent again and failed again: 0 and 1 are pending with attempts again, so they match
    # "failed" again; the cursor, stored with the recovery, still moves on to 5 (a restart
    # resumes there too).
    await store.pipeline.write_batch([
        _attempt(service.org, webhook, ids[0], success=False, state="pending", number=4),
        _attempt(service.org, webhook, ids[1], success=False, state="pending", number=3),
    ])  # fmt: skip
    restarted = Store(store.engine)
    assert await restarted.recoveries.park_next(recovery.id, 2) == 1
    assert await _states(store, webhook, ids) == [
        "pending", "pending", "succeeded", "pending", "parked", "parked",
    ]  # fmt: skip
    assert await store.events.delivery_state(foreign, other) == "failed"
    done = await store.recoveries.get(service.org, webhook, recovery.id)
    assert done is not None
    assert (done.state, done.total, done.queued) == ("done", 3, 3)
    assert done.finished_at is not None
    assert recovery.id not in [r.id for r in await store.recoveries.running()]
    assert await store.recoveries.park_next(recovery.id, 2) == 0


@pytest.mark.usefixtures("runner_leaves_recoveries_alone")
async def test_park_next_finishes_on_an_empty_batch(service: Service, receiver: Receiver) -> None:
    store = service.store
    webhook, _ids = await _scenario(service, receiver)
    since = datetime.now(UTC) - timedelta(hours=1)
    recovery = await store.recoveries.create(service.org, webhook, since, None, "failed")
    assert await store.recoveries.park_next(recovery.id, 3) == 3
    running = await store.recoveries.get(service.org, webhook, recovery.id)
    assert running is not None
    assert running.state == "running"  # a full batch: there may be more
    assert await store.recoveries.park_next(recovery.id, 3) == 0
    finished = await store.recoveries.get(service.org, webhook, recovery.id)
    assert finished is not None
    assert (finished.state, finished.queued) == ("done", 3)


@pytest.mark.usefixtures("runner_leaves_recoveries_alone")
async def test_status_all_takes_every_settled_delivery_but_no_fresh_or_parked_one(
    service: Service, receiver: Receiver
) -> None:
    store = service.store
    webhook, ids = await _scenario(service, receiver)
    since = datetime.now(UTC) - timedelta(hours=1)
    recovery = await store.recoveries.create(service.org, webhook, since, None, "all")
    assert recovery.total == 4  # 0, 1, 2 and 5
    assert await store.recoveries.park_next(recovery.id, 100) == 4
    assert await _states(store, webhook, ids) == ["parked"] * 3 + ["pending", "parked", "parked"]


@pytest.mark.usefixtures("runner_leaves_recoveries_alone")
async def test_the_window_bounds_the_deliveries(service: Service, receiver: Receiver) -> None:
    store = service.store
    webhook, ids = await _scenario(service, receiver)
    created = {
        row.event_id: row.created_at
        for row in (
            await _rows(store, sa.select(deliveries.c.event_id, deliveries.c.created_at)
                        .where(deliveries.c.webhook_id == webhook))
        )
    }  # fmt: skip
    # Up to delivery 1 only: 0 and 1 match, 5 (created later) does not.
    until = created[ids[1]]
    recovery = await store.recoveries.create(service.org, webhook, created[ids[0]], until, "failed")
    assert recovery.total == 2
    assert await store.recoveries.park_next(recovery.id, 10) == 2
    assert (await _states(store, webhook, ids))[5] == "failed"
    # From delivery 5 on: only 5.
    later = await store.recoveries.create(service.org, webhook, created[ids[5]], None, "failed")
    assert later.total == 1


async def _rows(store: Store, query: sa.Select[Any]) -> list[sa.Row[Any]]:
    async with store.engine.connect() as connection:
        return list((await connection.execute(query)).all())


@pytest.mark.usefixtures("runner_leaves_recoveries_alone")
async def test_the_same_window_while_it_runs_is_the_same_recovery(
    service: Service, receiver: Receiver
) -> None:
    store = service.store
    webhook, _ids = await _scenario(service, receiver)
    since = datetime.now(UTC) - timedelta(hours=1)
    until = datetime.now(UTC)
    first = await store.recoveries.create(service.org, webhook, since, until, "failed")
    assert (
        await store.recoveries.create(service.org, webhook, since, until, "failed")
    ).id == first.id
    assert (await store.recoveries.create(service.org, webhook, since, until, "all")).id != first.id
    open_ended = await store.recoveries.create(service.org, webhook, since, None, "failed")
    assert open_ended.id != first.id
    assert (
        await store.recoveries.create(service.org, webhook, since, None, "failed")
    ).id == open_ended.id
    while await store.recoveries.park_next(first.id, 10):
        pass
    again = await store.recoveries.create(service.org, webhook, since, until, "failed")
    assert again.id != first.id  # the first is done: a new one starts


# --- the API ---------------------------------------------------------------------------------


async def test_recover_and_follow_its_progress(service: Service, receiver: Receiver) -> None:
    webhook, _ids = await _scenario(service, receiver)
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    status, recovery = await service.call("POST", f"/webhooks/{webhook}/recover", {"since": since})
    assert status == 202, recovery
    assert set(recovery) == {
        "id", "webhook_id", "since", "until", "status", "state", "total", "queued",
        "created_at", "finished_at",
    }  # fmt: skip
    assert recovery["webhook_id"] == webhook
    assert (recovery["status"], recovery["state"], recovery["total"], recovery["queued"]) == (
        "failed", "running", 3, 0,
    )  # fmt: skip
    assert recovery["finished_at"] is None

    status, again = await service.call("POST", f"/webhooks/{webhook}/recover", {"since": since})
    assert status == 202
    assert again["id"] == recovery["id"]

    path = f"/webhooks/{webhook}/recoveries/{recovery['id']}"
    status, fetched = await service.call("GET", path)
    assert status == 200
    # The service's own worker may already have moved it on: only its progress can differ.
    assert {k: v for k, v in fetched.items() if k not in ("state", "queued", "finished_at")} == {
        k: v for k, v in recovery.items() if k not in ("state", "queued", "finished_at")
    }
    await service.store.recoveries.park_next(recovery["id"], 10)
    status, fetched = await service.call("GET", path)
    assert (fetched["state"], fetched["queued"]) == ("done", 3)
    assert fetched["finished_at"] is not None


@pytest.mark.usefixtures("runner_leaves_recoveries_alone")
async def test_the_same_window_at_once_is_one_recovery(
    service: Service, receiver: Receiver
) -> None:
    webhook = await _webhook(service, receiver)
    window = {"since": _ago(hours=1), "until": _ago(minutes=1)}
    answers = await asyncio.gather(
        *(service.call("POST", f"/webhooks/{webhook}/recover", window) for _ in range(20))
    )
    assert {status for status, _ in answers} == {202}
    assert len({recovery["id"] for _, recovery in answers}) == 1
    assert (
        len([r for r in await service.store.recoveries.running() if r.webhook_id == webhook]) == 1
    )


async def test_recoveries_of_another_org_are_not_found(
    service: Service, receiver: Receiver
) -> None:
    webhook = await _webhook(service, receiver)
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    status, recovery = await service.call("POST", f"/webhooks/{webhook}/recover", {"since": since})
    assert status == 202
    other = await service.token_for(f"org_{secrets.token_hex(6)}")
    for method, path, body in [
        ("GET", f"/webhooks/{webhook}/recoveries/{recovery['id']}", None),
        ("POST", f"/webhooks/{webhook}/recover", {"since": since}),
    ]:
        status, answer = await service.call(method, path, body, token=other)
        assert status == 404, answer
        assert answer["error"]["code"] == "not_found"
    other_webhook = await _webhook(service, receiver)
    for path in (
        f"/webhooks/{webhook}/recoveries/rcv_missing",
        f"/webhooks/{other_webhook}/recoveries/{recovery['id']}",  # another endpoint's
    ):
        status, answer = await service.call("GET", path)
        assert status == 404
        assert answer["error"]["code"] == "not_found"


def _ago(**delta: float) -> str:
    return (datetime.now(UTC) - timedelta(**delta)).isoformat()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"since": _ago(days=31)}, "retention"),
        ({"since": _ago(hours=1), "until": _ago(hours=2)}, "until"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-11-28"}, "since"),
        ({"since": _ago(hours=1), "until": "soon"}, "until"),
        ({"since": _ago(hours=1), "until": "9999-12-31T23:59:59-01:00"}, "until: Value error"),
        ({"since": _ago(hours=-1)}, "future"),
        ({"since": _ago(hours=1), "status": "succeeded"}, "status"),
        ({"since": _ago(hours=1), "bogus": 1}, "bogus"),
        ({}, "since"),
    ],
)
async def test_recover_refuses_bad_input_and_creates_nothing(
    service: Service, receiver: Receiver, body: dict[str, Any], fragment: str
) -> None:
    webhook = await _webhook(service, receiver)
    status, answer = await service.call("POST", f"/webhooks/{webhook}/recover", body)
    assert status == 400, answer
    assert answer["error"]["code"] == "validation_error"
    assert fragment in answer["error"]["message"]
    assert [r for r in await service.store.recoveries.running() if r.webhook_id == webhook] == []


async def test_recover_refuses_a_disabled_endpoint(service: Service, receiver: Receiver) -> None:
    webhook = await _webhook(service, receiver, enabled=False)
    status, answer = await service.call(
        "POST", f"/webhooks/{webhook}/recover", {"since": _ago(hours=1)}
    )
    assert status == 400
    assert "disabled" in answer["error"]["message"]
    assert [r for r in await service.store.recoveries.running() if r.webhook_id == webhook] == []


async def test_recover_refuses_a_window_too_large(
    service: Service, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    webhook, _ids = await _scenario(service, receiver)
    monkeypatch.setattr(recoveries, "MAX_RECOVERY_DELIVERIES", 2)
    status, answer = await service.call(
        "POST", f"/webhooks/{webhook}/recover", {"since": _ago(hours=1)}
    )
    assert status == 400
    assert answer["error"]["code"] == "validation_error"
    assert "window too large" in answer["error"]["message"]
    assert "since, until" in answer["error"]["message"]
    assert [r for r in await service.store.recoveries.running() if r.webhook_id == webhook] == []


# --- the schema ------------------------------------------------------------------------------


async def test_migrations_build_exactly_the_tables(store: Store) -> None:
    def differences(connection: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with store.engine.connect() as connection:
        assert await connection.run_sync(differences) == []
