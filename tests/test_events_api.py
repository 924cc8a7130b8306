"""Events, event types, delivery filters and endpoint stats over real HTTP, on both databases."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from schemas.events import EVENT_TYPES
from tests.conftest import Receiver, Service
from worker.store.ids import new_id
from worker.store.records import Attempt, AttemptRecord, DeliveryState, NewEvent

pytestmark = pytest.mark.timeout(60)


async def _webhook(service: Service, receiver: Receiver, **fields: object) -> str:
    body = {"url": receiver.url("/hook"), "events": ["order.created"], **fields}
    status, created = await service.call("POST", "/webhooks", body)
    assert status == 201, created
    return str(created["id"])


def _envelope(org: str, event_type: str = "order.created", **data: object) -> dict[str, Any]:
    return {
        "id": f"evt_{secrets.token_hex(8)}",
        "type": event_type,
        "organization_id": org,
        "occurred_at": "2026-11-28T10:00:00+00:00",
        "data": dict(data),
    }


async def _events(
    service: Service,
    org: str,
    types: list[str],
    to: tuple[str, ...] = (),
    parked: frozenset[str] = frozenset(),
) -> list[str]:
    """Write one event per type, one batch each (so each is received after the one before)."""
    ids = []
    for n, event_type in enumerate(types):
        envelope = _envelope(org, event_type, n=n)
        occurred = datetime.fromisoformat(envelope["occurred_at"])
        await service.store.pipeline.write_batch([NewEvent(envelope, occurred, to, parked)])
        ids.append(envelope["id"])
        await asyncio.sleep(0.002)
    return ids


def _attempt(
    org: str, webhook_id: str, event_id: str, *, number: int = 1, success: bool = True,
    duration_ms: int = 10, at: datetime | None = None, state: DeliveryState | None = None,
    event_type: str = "order.created",
) -> AttemptRecord:  # fmt: skip
    at = at or datetime.now(UTC)
    return AttemptRecord(
        Attempt(
            id=new_id("att", now_ms=int(at.timestamp() * 1000)),
            webhook_id=webhook_id,
            org_id=org,
            event_id=event_id,
            event_type=event_type,
            attempt=number,
            success=success,
            status_code=200 if success else 503,
            error_kind=None if success else "http_status",
            error_message=None if success else "HTTP 503",
            duration_ms=duration_ms,
            response_body="ok",
            created_at=at,
        ),
        state or ("succeeded" if success else "pending"),
        None,
    )


def _q(at: datetime) -> str:
    return quote(at.isoformat())


# --- event types ---------------------------------------------------------------------------


async def test_event_types_list_every_subscribable_type_and_the_test_event(
    service: Service,
) -> None:
    status, body = await service.call("GET", "/event-types")
    assert status == 200
    names = [t["name"] for t in body["data"]]
    assert names == [*EVENT_TYPES, "webhook.test"]
    for item in body["data"]:
        assert item["description"]
        schema = item["schema"]
        assert schema["required"] == ["id", "type", "timestamp", "data"]
        assert schema["properties"]["type"] == {"const": item["name"]}
        assert schema["properties"]["data"]["type"] == "object"


# --- events ----------------------------------------------------------------------------------


async def test_events_newest_first_filtered_and_paginated(
    service: Service, receiver: Receiver
) -> None:
    other_org = f"org_{secrets.token_hex(6)}"
    ids = await _events(service, service.org, ["order.created", "ticket.created", "order.created"])
    middle = datetime.now(UTC)
    await asyncio.sleep(0.01)
    later = await _events(service, service.org, ["order.updated"])
    foreign = await _events(service, other_org, ["order.created"])

    status, body = await service.call("GET", "/events")
    assert status == 200
    assert [e["id"] for e in body["data"]] == [*later, *ids[::-1]]
    assert body["has_more"] is False
    assert body["next_cursor"] is None
    first = body["data"][-1]
    assert set(first) == {"id", "type", "occurred_at", "received_at", "data"}
    assert first["type"] == "order.created"
    assert first["data"] == {"n": 0}
    assert first["occurred_at"].startswith("2026-11-28T10:00:00")
    assert foreign[0] not in [e["id"] for e in body["data"]]

    status, body = await service.call("GET", "/events?type=order.created")
    assert [e["id"] for e in body["data"]] == [ids[2], ids[0]]
    status, body = await service.call("GET", f"/events?since={_q(middle)}")
    assert [e["id"] for e in body["data"]] == later
    status, body = await service.call("GET", f"/events?until={_q(middle)}")
    assert [e["id"] for e in body["data"]] == ids[::-1]

    seen: list[str] = []
    path = "/events?limit=2"
    while True:
        status, page = await service.call("GET", path)
        assert status == 200
        assert len(page["data"]) <= 2
        seen += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        path = f"/events?limit=2&cursor={page['next_cursor']}"
    assert seen == [*later, *ids[::-1]]


async def test_event_with_its_deliveries(service: Service, receiver: Receiver) -> None:
    fast = await _webhook(service, receiver)
    slow = await _webhook(service, receiver)
    (event_id,) = await _events(
        service, service.org, ["order.created"], (fast, slow), frozenset({slow})
    )
    first = datetime.now(UTC) - timedelta(seconds=30)
    second = first + timedelta(seconds=10)
    await service.store.pipeline.write_batch([
        _attempt(service.org, fast, event_id, number=1, success=False, at=first),
    ])  # fmt: skip
    await service.store.pipeline.write_batch([
        _attempt(service.org, fast, event_id, number=2, success=True, at=second),
    ])  # fmt: skip

    status, body = await service.call("GET", f"/events/{event_id}")
    assert status == 200, body
    assert body["id"] == event_id
    deliveries = {d["webhook_id"]: d for d in body["deliveries"]}
    assert set(deliveries) == {fast, slow}
    assert deliveries[fast]["state"] == "succeeded"
    assert deliveries[fast]["attempts"] == 2
    assert deliveries[fast]["last_status_code"] == 200
    assert datetime.fromisoformat(deliveries[fast]["last_attempt_at"]) == second
    assert deliveries[fast]["next_attempt_at"] is None
    assert deliveries[slow] == {
        "webhook_id": slow, "state": "parked", "attempts": 0, "last_attempt_at": None,
        "last_status_code": None, "next_attempt_at": None,
    }  # fmt: skip


async def test_another_orgs_event_is_not_found(service: Service) -> None:
    (foreign,) = await _events(service, f"org_{secrets.token_hex(6)}", ["order.created"])
    for event_id in (foreign, "evt_missing"):
        status, body = await service.call("GET", f"/events/{event_id}")
        assert status == 404
        assert body["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("since=yesterday", "since"),
        ("until=2026-11-28", "until"),  # a date alone is not an RFC 3339 time
        ("since=2026-11-28T10:00:00", "since"),  # no offset
        ("since=1700000000", "since"),
        ("since=2026-11-28T10:00:00Z&until=2026-11-27T10:00:00Z", "until"),
        # Valid RFC 3339, but before year 1 or after 9999 once in UTC.
        ("since=0001-01-01T00:00:00%2B01:00", "since: Value error, out of range"),
        ("until=9999-12-31T23:59:59-01:00", "until: Value error, out of range"),
        ("type=", "type"),
        ("type=nope.nope", "type: Input should be 'order.created'"),
        ("type=order.deleted", "type: Input should be"),
        ("limit=0", "limit"),
    ],
)
async def test_events_refuse_bad_query(service: Service, query: str, name: str) -> None:
    status, body = await service.call("GET", f"/events?{query}")
    assert status == 400
    assert body["error"]["code"] == "validation_error"
    assert name in body["error"]["message"]


# --- deliveries filters ----------------------------------------------------------------------


async def test_deliveries_filter_by_event_type_and_time(
    service: Service, receiver: Receiver
) -> None:
    webhook = await _webhook(service, receiver, events=["order.created", "ticket.created"])
    order, ticket = await _events(
        service, service.org, ["order.created", "ticket.created"], (webhook,)
    )
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    records = [
        _attempt(service.org, webhook, order, number=1, success=False, at=t0),
        _attempt(service.org, webhook, ticket, number=1, success=False,
                 at=t0 + timedelta(minutes=1), event_type="ticket.created"),
        _attempt(service.org, webhook, order, number=2, at=t0 + timedelta(minutes=2)),
        _attempt(service.org, webhook, ticket, number=2, at=t0 + timedelta(minutes=3),
                 event_type="ticket.created"),
    ]  # fmt: skip
    for record in records:
        await service.store.pipeline.write_batch([record])
    ids = [r.attempt.id for r in records]
    base = f"/webhooks/{webhook}/deliveries"

    async def listed(query: str) -> list[str]:
        status, body = await service.call("GET", f"{base}?{query}")
        assert status == 200, body
        return [a["id"] for a in body["data"]]

    assert await listed("") == ids[::-1]
    assert await listed(f"event_id={order}") == [ids[2], ids[0]]
    assert await listed("event_type=ticket.created") == [ids[3], ids[1]]
    assert await listed(f"since={_q(t0 + timedelta(minutes=1))}") == [ids[3], ids[2], ids[1]]
    assert await listed(f"until={_q(t0 + timedelta(minutes=1))}") == [ids[1], ids[0]]
    assert await listed(f"event_id={order}&status=failed") == [ids[0]]
    assert await listed("event_id=evt_none") == []
    # Filtered pages keep their filter across the cursor.
    status, page = await service.call("GET", f"{base}?event_type=ticket.created&limit=1")
    assert [a["id"] for a in page["data"]] == [ids[3]]
    assert page["has_more"] is True
    status, page = await service.call(
        "GET", f"{base}?event_type=ticket.created&limit=1&cursor={page['next_cursor']}"
    )
    assert [a["id"] for a in page["data"]] == [ids[1]]
    assert page["has_more"] is False

    for query in (
        "since=soon",
        "until=2026-13-01T00:00:00Z",
        f"since={_q(t0)}&until={_q(t0 - timedelta(1))}",
    ):
        status, body = await service.call("GET", f"{base}?{query}")
        assert status == 400, query
        assert body["error"]["code"] == "validation_error"
    status, body = await service.call("GET", f"{base}?event_type=nope")
    assert status == 400, body
    assert body["error"]["message"].startswith("event_type: Input should be 'order.created'")
    assert await listed("event_type=webhook.test") == []  # a known type, of no attempt here
    for name, value in (
        ("since", "0001-01-01T00:00:00%2B01:00"),
        ("until", "9999-12-31T23:59:59-01:00"),
    ):
        status, body = await service.call("GET", f"{base}?{name}={value}")
        assert status == 400, body
        assert body["error"]["message"].startswith(f"{name}: Value error, out of range"), body
    # The first and last instants that are in range are answered as any other.
    edges = "since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59.999999Z"
    assert await listed(edges) == ids[::-1]
    status, body = await service.call("GET", f"/events?{edges}")
    assert status == 200, body


# --- stats -----------------------------------------------------------------------------------


async def test_stats_from_known_attempts(service: Service, receiver: Receiver) -> None:
    webhook = await _webhook(service, receiver)
    event_ids = await _events(service, service.org, ["order.created"] * 3, (webhook,))
    now = datetime.now(UTC)
    start = now - timedelta(minutes=30)
    # Before the window: excluded from counts and percentiles.
    await service.store.pipeline.write_batch([
        _attempt(service.org, webhook, event_ids[2], success=True, duration_ms=9000,
                 at=now - timedelta(hours=2)),
    ])  # fmt: skip
    # 21 attempts in the window, 10 ms … 210 ms: p50 = 110, p95 = 200 (exact ranks).
    ok = [
        _attempt(service.org, webhook, event_ids[0], number=n + 1, duration_ms=10 * (n + 1),
                 at=start + timedelta(seconds=n))
        for n in range(15)
    ]  # fmt: skip
    bad = [
        _attempt(service.org, webhook, event_ids[1], number=n - 14, success=False,
                 duration_ms=10 * (n + 1), at=start + timedelta(seconds=n))
        for n in range(15, 21)
    ]  # fmt: skip
    await service.store.pipeline.write_batch(ok)
    await service.store.pipeline.write_batch(bad)  # only failures: a failure run starts

    status, stats = await service.call(
        "GET", f"/webhooks/{webhook}/stats?since={_q(now - timedelta(hours=1))}"
    )
    assert status == 200, stats
    assert stats["webhook_id"] == webhook
    assert datetime.fromisoformat(stats["since"]) == now - timedelta(hours=1)
    assert stats["attempts"] == {"succeeded": 15, "failed": 6}
    assert stats["success_ratio"] == 15 / 21
    assert stats["duration_ms"] == {"p50": 110.0, "p95": 200.0}
    assert datetime.fromisoformat(stats["last_success_at"]) == start + timedelta(seconds=14)
    assert datetime.fromisoformat(stats["last_failure_at"]) == start + timedelta(seconds=20)
    assert datetime.fromisoformat(stats["failing_since"]) == start + timedelta(seconds=15)
    # Event 1 is pending between retries; events 0 and 2 succeeded.
    assert stats["backlog"] == {"pending": 1, "parked": 0}
    assert stats["state"] == "failing"

    # The default window is the last 24 hours: the 2-hour-old attempt is in it.
    status, stats = await service.call("GET", f"/webhooks/{webhook}/stats")
    assert status == 200
    assert stats["attempts"] == {"succeeded": 16, "failed": 6}
    until = datetime.fromisoformat(stats["until"])
    assert datetime.fromisoformat(stats["since"]) == until - timedelta(hours=24)


async def test_stats_states(service: Service, receiver: Receiver) -> None:
    idle = await _webhook(service, receiver)
    slow = await _webhook(service, receiver)
    parked = await _webhook(service, receiver)
    paused = await _webhook(service, receiver, enabled=False)
    (event_id,) = await _events(
        service, service.org, ["order.created"], (slow, parked), frozenset({parked})
    )
    await service.store.pipeline.write_batch([
        _attempt(service.org, slow, event_id, duration_ms=250),
    ])  # fmt: skip

    async def stats_of(webhook: str) -> dict[str, Any]:
        status, body = await service.call("GET", f"/webhooks/{webhook}/stats")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    empty = await stats_of(idle)
    assert empty["state"] == "healthy"
    assert empty["success_ratio"] is None
    assert empty["duration_ms"] == {"p50": None, "p95": None}
    assert empty["attempts"] == {"succeeded": 0, "failed": 0}
    assert empty["last_success_at"] is None
    fast_enough = await stats_of(slow)
    assert fast_enough["duration_ms"] == {"p50": 250.0, "p95": 250.0}
    assert fast_enough["state"] == "slow"  # p95 >= 250 ms
    backlog = await stats_of(parked)
    assert backlog["backlog"] == {"pending": 0, "parked": 1}
    assert backlog["state"] == "slow"
    assert (await stats_of(paused))["state"] == "disabled"


async def test_stats_of_another_org_and_bad_since(service: Service, receiver: Receiver) -> None:
    webhook = await _webhook(service, receiver)
    other = await service.token_for(f"org_{secrets.token_hex(6)}")
    status, body = await service.call("GET", f"/webhooks/{webhook}/stats", token=other)
    assert status == 404
    assert body["error"]["code"] == "not_found"
    for query in ("since=today", "since=2999-01-01T00:00:00Z", "until=2026-11-28T10:00:00Z"):
        status, body = await service.call("GET", f"/webhooks/{webhook}/stats?{query}")
        assert status == 400, query
        assert body["error"]["code"] == "validation_error"
