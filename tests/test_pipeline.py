"""The delivery pipeline end to end: real RabbitMQ, real HTTPS receivers, both databases."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
import standardwebhooks
from aiohttp import web

from schemas.publish import publish_event
from tests.chaos_support import queues_idle
from tests.conftest import (
    Received,
    Receiver,
    Service,
    ServiceFactory,
    eventually,
    make_settings,
    run_service,
)
from worker.pipeline import topology
from worker.pipeline.writer import PipelineRecord
from worker.store import Store, tables
from worker.store.records import AttemptRecord, NewEvent

pytestmark = pytest.mark.timeout(90)


async def _webhook(
    service: Service, url: str, events: list[str], token: str | None = None
) -> dict[str, str]:
    status, body = await service.call("POST", "/webhooks", {"url": url, "events": events}, token)
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def _disabled(service: Service, webhook_id: str) -> dict[str, object]:
    """Wait until the endpoint shows as disabled; return it."""
    body: dict[str, object] = {}

    async def disabled() -> bool:
        nonlocal body
        _, body = await service.call("GET", f"/webhooks/{webhook_id}")
        return body["enabled"] is False

    await eventually(disabled, what="endpoint disabled")
    return body


def _verify(received: Received, secret: str) -> dict[str, object]:
    """Verify with the reference Standard Webhooks library; return the payload."""
    payload = standardwebhooks.Webhook(secret).verify(received.body, received.headers)
    assert isinstance(payload, dict)
    return payload


async def _attempts(service: Service, webhook_id: str, count: int) -> list[dict[str, object]]:
    """Wait until the deliveries endpoint lists ``count`` attempts; return them."""
    listed: list[dict[str, object]] = []

    async def enough() -> bool:
        nonlocal listed
        status, body = await service.call("GET", f"/webhooks/{webhook_id}/deliveries")
        assert status == 200
        listed = body["data"]
        return len(listed) >= count

    await eventually(enough, what=f"{count} attempts listed")
    return listed


async def test_events_reach_exactly_the_subscribed_endpoints(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    org_b = service.org + "_b"
    token_b = await service.token_for(org_b)
    orders = await _webhook(service, receiver.url("/a-orders"), ["order.created", "order.updated"])
    tickets = await _webhook(service, receiver.url("/a-tickets"), ["ticket.created"])
    b_orders = await _webhook(service, receiver.url("/b-orders"), ["order.created"], token_b)

    sent = [
        await publish_event(broker, "order.created", service.org, {"n": 1}),
        await publish_event(broker, "order.updated", service.org, {"n": 2}),
        await publish_event(broker, "ticket.created", service.org, {"n": 3}),
        await publish_event(broker, "expense.created", service.org, {"n": 4}),  # nobody
        await publish_event(broker, "order.created", org_b, {"n": 5}),
        await publish_event(broker, "ticket.created", org_b, {"n": 6}),  # nobody
    ]
    await receiver.wait_for(lambda r: len(r) >= 4)
    # Let any stray delivery arrive before counting: wait for the last event's fan-out to be
    # recorded in the store, after which no further task for these events can exist.
    for envelope in sent:

        async def stored(event_id: str = envelope.id) -> bool:
            return await service.store.events.get(event_id) is not None

        await eventually(stored, what="event stored")

    secrets = {"/a-orders": orders, "/a-tickets": tickets, "/b-orders": b_orders}
    got = {(r.path, _verify(r, s)["id"]) for r, s in _with_secrets(receiver.received, secrets)}
    assert got == {
        ("/a-orders", sent[0].id),
        ("/a-orders", sent[1].id),
        ("/a-tickets", sent[2].id),
        ("/b-orders", sent[4].id),
    }
    first = receiver.at("/a-orders")[0]
    payload = json.loads(first.body)
    assert set(payload) == {"id", "type", "timestamp", "data"}
    assert first.headers["webhook-id"] == payload["id"]
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["User-Agent"].startswith("Sellfern-Webhooks/")


def _with_secrets(
    received: list[Received], by_path: dict[str, dict[str, str]]
) -> list[tuple[Received, str]]:
    return [(r, by_path[r.path]["secret"]) for r in received]


async def test_failing_receiver_is_retried_and_attempts_are_listed(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def flaky(_request: web.Request, seen: int) -> web.Response:
        return web.Response(status=500, text="db down") if seen < 2 else web.Response(text="ok")

    receiver.behaviours["/flaky"] = flaky
    webhook = await _webhook(service, receiver.url("/flaky"), ["order.created"])
    event = await publish_event(broker, "order.created", service.org, {"order_id": "o1"})
    await receiver.wait_for(lambda _: len(receiver.at("/flaky")) >= 3)

    attempts = await _attempts(service, webhook["id"], 3)
    assert [a["attempt"] for a in attempts] == [3, 2, 1]  # newest first
    assert [a["status_code"] for a in attempts] == [200, 500, 500]
    assert [a["success"] for a in attempts] == [True, False, False]
    assert attempts[1]["error"] == {"kind": "http_status", "message": "HTTP 500"}
    assert attempts[1]["response_body"] == "db down"
    assert {a["event_id"] for a in attempts} == {event.id}
    # The same webhook-id on every retry, so receivers can deduplicate.
    ids = {r.headers["webhook-id"] for r in receiver.at("/flaky")}
    assert ids == {event.id}
    for r in receiver.at("/flaky"):
        _verify(r, webhook["secret"])
    assert await service.store.events.delivery_state(event.id, webhook["id"]) == "succeeded"

    status, failed = await service.call(
        "GET", f"/webhooks/{webhook['id']}/deliveries?status=failed&limit=1"
    )
    assert status == 200
    assert [a["attempt"] for a in failed["data"]] == [2]
    assert failed["has_more"] is True


async def test_schedule_exhaustion_marks_failed_and_dead_letters(
    service: Service,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
    amqp_url: str,
) -> None:
    async def always_503(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "0"})

    receiver.behaviours["/down"] = always_503
    webhook = await _webhook(service, receiver.url("/down"), ["order.created"])
    event = await publish_event(broker, "order.created", service.org, {})
    attempts = await _attempts(service, webhook["id"], 3)  # immediate + schedule of two
    assert [a["attempt"] for a in attempts] == [3, 2, 1]

    async def failed() -> bool:
        return await service.store.events.delivery_state(event.id, webhook["id"]) == "failed"

    await eventually(failed, what="delivery marked failed")
    # The last attempt published no retry: the task went to webhooks.dead instead.
    dead = await _dead_letter(amqp_url, event.id)
    assert dead.headers["x-reason"] == "exhausted"
    assert len(receiver.at("/down")) == 3


async def test_a_retry_whose_record_failed_is_scheduled_once(
    service: Service,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
    amqp_url: str,
) -> None:
    """The write of attempt 2's record fails once, with the database up: the task is handled
    again and attempt 2 sent again, but only one retry follows it. Published beside the
    failed write, the first retry started a second chain of attempts to the end."""

    async def always_503(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "0"})

    receiver.behaviours["/down"] = always_503
    webhook = await _webhook(service, receiver.url("/down"), ["order.created"])
    worker = service.running.worker
    assert worker is not None
    writer = worker._writer
    write = writer._write
    failed_once: list[int] = []

    async def failing_once(batch: list[PipelineRecord]) -> None:
        second = [r for r in batch if isinstance(r, AttemptRecord) and r.attempt.attempt == 2]
        if second and not failed_once:
            failed_once.append(1)
            raise RuntimeError("injected: the batch with attempt 2 is not written")
        await write(batch)

    writer._write = failing_once
    event = await publish_event(broker, "order.created", service.org, {})

    async def settled() -> bool:
        state = await service.store.events.delivery_state(event.id, webhook["id"])
        return (
            state == "failed"
            and not worker._handlers  # no message taken up, none waiting to be requeued
            and await queues_idle(
                amqp_url, service.running.settings.retry_schedule,
                service.running.settings.retry_jitter,
            )
        )  # fmt: skip

    await eventually(settled, what="the delivery failed for good and nothing left queued")
    assert failed_once
    numbers = sorted(int(str(a["attempt"])) for a in await _attempts(service, webhook["id"], 3))
    assert numbers == [1, 2, 3]  # attempt 2 sent twice, recorded once
    assert len(receiver.at("/down")) == 4


async def test_redirect_is_a_failure_and_not_followed(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def redirect(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(status=302, headers={"Location": receiver.url("/target")})

    receiver.behaviours["/moved"] = redirect
    webhook = await _webhook(service, receiver.url("/moved"), ["order.created"])
    await publish_event(broker, "order.created", service.org, {})
    attempts = await _attempts(service, webhook["id"], 1)
    assert attempts[-1]["status_code"] == 302
    assert attempts[-1]["success"] is False
    assert attempts[-1]["error"]["kind"] == "redirect_not_followed"  # type: ignore[index]
    assert receiver.at("/target") == []


async def test_a_binary_response_body_is_recorded_and_spoils_no_batch(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    # PostgreSQL's text refuses NUL: kept as it came, this excerpt failed every batch its
    # attempt joined, other endpoints' attempts and events with it, again at each redelivery.
    async def png(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", content_type="image/png")

    receiver.behaviours["/png"] = png
    binary = await _webhook(service, receiver.url("/png"), ["order.created"])
    plain = await _webhook(service, receiver.url("/plain"), ["order.created"])
    for _ in range(3):
        await publish_event(broker, "order.created", service.org, {})
    answered = await _attempts(service, binary["id"], 3)
    assert all(a["success"] for a in answered)
    assert {a["response_body"] for a in answered} == {"\ufffdPNG\r\n\x1a\n\ufffd\ufffd\ufffd\rIHDR"}
    assert all(a["success"] for a in await _attempts(service, plain["id"], 3))


async def test_gone_disables_the_endpoint(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def gone(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(status=410)

    receiver.behaviours["/gone"] = gone
    webhook = await _webhook(service, receiver.url("/gone"), ["order.created"])
    await publish_event(broker, "order.created", service.org, {})
    await _attempts(service, webhook["id"], 1)
    body = await _disabled(service, webhook["id"])
    assert "410" in str(body["disabled_reason"])


async def test_paused_and_deleted_endpoints_receive_nothing_new(
    service: Service, receiver: Receiver, broker: aio_pika.abc.AbstractRobustConnection
) -> None:
    async def fail_first(_request: web.Request, seen: int) -> web.Response:
        return web.Response(status=500 if seen == 0 else 200)

    receiver.behaviours["/paused"] = fail_first
    paused = await _webhook(service, receiver.url("/paused"), ["order.created"])
    deleted = await _webhook(service, receiver.url("/deleted"), ["order.created"])
    live = await _webhook(service, receiver.url("/live"), ["order.created"])

    # A retry already waiting in its tier when the endpoint is paused is not attempted.
    await publish_event(broker, "order.created", service.org, {"n": 1})
    await _attempts(service, paused["id"], 1)
    await receiver.wait_for(lambda _: len(receiver.at("/deleted")) == 1)
    skipped = service.running.metrics.attempts.labels("order.created", "skipped", "none")
    before = skipped._value.get()
    status, _ = await service.call("PATCH", f"/webhooks/{paused['id']}", {"enabled": False})
    assert status == 200
    status, _ = await service.call("DELETE", f"/webhooks/{deleted['id']}")
    assert status == 204

    async def retry_skipped() -> bool:
        return bool(skipped._value.get() >= before + 1)

    await eventually(retry_skipped, what="queued retry skipped")

    # New events reach only the live endpoint.
    event = await publish_event(broker, "order.created", service.org, {"n": 2})
    await receiver.wait_for(lambda _: len(receiver.at("/live")) == 2)
    assert len(receiver.at("/paused")) == 1
    assert len(receiver.at("/deleted")) == 1
    assert await service.store.events.delivery_state(event.id, paused["id"]) is None
    assert await service.store.events.delivery_state(event.id, deleted["id"]) is None
    assert receiver.at("/live")[-1].headers["webhook-id"] == event.id

    async def live_succeeded() -> bool:
        return await service.store.events.delivery_state(event.id, live["id"]) == "succeeded"

    await eventually(live_succeeded, what="the live endpoint's delivery recorded")


async def _dead_letter(amqp_url: str, marker: str) -> aio_pika.abc.AbstractIncomingMessage:
    """The message in webhooks.dead whose body contains ``marker`` (others are consumed)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.DEAD_QUEUE)
        async with asyncio.timeout(10), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if marker.encode() in message.body:
                    return message
    finally:
        await connection.close()
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"id": "evt_MARKER", not json', "invalid_json"),
        (
            (
                b'{"id": "evt_MARKER", "type": "order.deleted", "organization_id": "org_x",'
                b' "occurred_at": "2026-01-01T00:00:00Z", "data": {}}'
            ),
            "unknown_type",
        ),
        (b'{"id": "evt_MARKER", "type": "order.created", "data": {}}', "invalid_envelope"),
        (b'{"id": "evt_MARKER", "x": "\xff\xfe"}', "invalid_encoding"),
        (b'{"id": "evt_MARKER", "d": ' + b"[" * 100 + b"]" * 100 + b"}", "too_deep"),
        (b'{"id": "evt_MARKER", "n": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b'{"id": "evt_MARKER", "pad": "' + b"x" * 300_000 + b'"}', "oversize"),
        (
            (
                b'{"id": "evt_MARKER", "type": "order.created", "organization_id": "ORG",'
                b' "occurred_at": "2026-01-01T00:00:00Z", "data": {"total": NaN}}'
            ),
            "invalid_json",
        ),
        (
            (
                b'{"id": "evt_MARKER", "type": "order.created", "organization_id": "ORG",'
                b' "occurred_at": 1767225600, "data": {}}'
            ),
            "invalid_envelope",
        ),
        (
            (
                b'{"id": "evt_MARKER", "type": "order.created", "organization_id": "ORG",'
                b' "occurred_at": "2026-01-01T00:00:00Z", "data": {"name": "\\ud800"}}'
            ),
            "invalid_json",
        ),
    ],
    ids=[
        "bad-json",
        "unknown-type",
        "no-organization",
        "not-utf8",
        "too-deep",
        "long-number",
        "oversize",
        "not-a-number",
        "numeric-time",
        "lone-surrogate",
    ],
)
async def test_malformed_events_are_dead_lettered_and_delivery_continues(
    service: Service,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
    amqp_url: str,
    body: bytes,
    reason: str,
) -> None:
    await _webhook(service, receiver.url("/ok"), ["order.created"])
    marker = f"evt_{os.urandom(6).hex()}"
    channel = await broker.channel()
    exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE)
    # ORG: the service's organization, whose endpoint the event would reach if it were taken.
    body = body.replace(b"evt_MARKER", marker.encode())
    body = body.replace(b'"ORG"', f'"{service.org}"'.encode())
    await exchange.publish(aio_pika.Message(body), routing_key="order.created")
    good = await publish_event(broker, "order.created", service.org, {})
    await receiver.wait_for(lambda r: any(x.headers["webhook-id"] == good.id for x in r))
    dead = await _dead_letter(amqp_url, marker)
    assert dead.headers["x-reason"] == reason
    assert dead.headers["x-detail"]
    rejected = service.running.metrics.events_rejected.labels(reason)
    assert rejected._value.get() >= 1


async def test_test_endpoint_and_redelivery(service: Service, receiver: Receiver) -> None:
    webhook = await _webhook(service, receiver.url("/t"), ["order.created"])
    status, attempt = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200, attempt
    assert attempt["success"] is True
    assert attempt["event_type"] == "webhook.test"
    assert attempt["status_code"] == 200
    payload = _verify(receiver.at("/t")[0], webhook["secret"])
    assert payload["type"] == "webhook.test"

    status, again = await service.call(
        "POST", f"/webhooks/{webhook['id']}/deliveries/{attempt['id']}/retry"
    )
    assert status == 200, again
    assert again["attempt"] == 2
    assert again["event_id"] == attempt["event_id"]
    assert receiver.at("/t")[1].headers["webhook-id"] == attempt["event_id"]
    listed = await _attempts(service, webhook["id"], 2)
    assert [a["id"] for a in listed] == [again["id"], attempt["id"]]
    status, _ = await service.call("POST", f"/webhooks/{webhook['id']}/deliveries/att_nope/retry")
    assert status == 404


async def test_unreachable_endpoint_records_connection_error(
    service: Service, receiver: Receiver
) -> None:
    webhook = await _webhook(service, "https://127.0.0.1:1/closed", ["order.created"])
    status, attempt = await service.call("POST", f"/webhooks/{webhook['id']}/test")
    assert status == 200
    assert attempt["success"] is False
    assert attempt["status_code"] is None
    assert attempt["error"]["kind"] == "connection_refused"


async def test_rotated_secret_signs_alongside_the_old_one(
    service: Service, receiver: Receiver
) -> None:
    webhook = await _webhook(service, receiver.url("/r"), ["order.created"])
    status, rotated = await service.call("POST", f"/webhooks/{webhook['id']}/rotate-secret")
    assert status == 200
    assert rotated["secret"] != webhook["secret"]
    await service.call("POST", f"/webhooks/{webhook['id']}/test")
    received = receiver.at("/r")[0]
    assert len(received.headers["webhook-signature"].split()) == 2
    _verify(received, webhook["secret"])
    _verify(received, rotated["secret"])


async def test_slow_endpoint_does_not_hold_up_others(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    release = asyncio.Event()
    # Counted when a request arrives, not when it completes: the stuck ones never complete
    # before the assertions.
    arrived = 0

    async def stuck(_request: web.Request, _seen: int) -> web.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return web.Response()

    receiver.behaviours["/slow"] = stuck
    service = await service_factory(delivery_concurrency=8, endpoint_concurrency=2)
    await _webhook(service, receiver.url("/slow"), ["order.created"])
    await _webhook(service, receiver.url("/fast"), ["order.updated"])
    for _ in range(10):
        await publish_event(broker, "order.created", service.org, {})
    for _ in range(20):
        await publish_event(broker, "order.updated", service.org, {})
    try:
        await receiver.wait_for(lambda _: len(receiver.at("/fast")) == 20, timeout=20)
        # The slow endpoint never holds more than its cap of the eight slots; the rest of its
        # deliveries wait parked in the database (or deferred in the broker), not in slots.
        assert arrived == 2
        metrics = service.running.metrics
        parked = metrics.deliveries_published.labels("order.created", "parked")._value.get()
        assert parked + metrics.deferred._value.get() > 0
    finally:
        release.set()
    # Once the endpoint answers, the parked deliveries are released and delivered.
    await receiver.wait_for(lambda _: len(receiver.at("/slow")) == 10, timeout=30)


async def test_sigterm_under_load_loses_nothing(
    database_url: str,
    amqp_url: str,
    ca_bundle: str,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
    org: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    settings = make_settings(database_url, amqp_url, ca_bundle)
    async with run_service(settings, role="api") as api:
        webhook = await api.store.endpoints.create(
            org, receiver.url("/load"), ["order.created"], "", enabled=True
        )

    async def slowish(_request: web.Request, _seen: int) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response()

    receiver.behaviours["/load"] = slowish
    sent = [(await publish_event(broker, "order.created", org, {"i": i})).id for i in range(150)]
    env = {
        **os.environ,
        "SELLFERN_WEBHOOKS_DATABASE_URL": database_url,
        "SELLFERN_WEBHOOKS_AMQP_URL": amqp_url,
        "SELLFERN_WEBHOOKS_CA_BUNDLE": ca_bundle,
        "SELLFERN_WEBHOOKS_ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8",
        "SELLFERN_WEBHOOKS_METRICS_PORT": "0",
        "SELLFERN_WEBHOOKS_API_HOST": "127.0.0.1",
        "SELLFERN_WEBHOOKS_RETRY_SCHEDULE": "0.3,0.3",
        "SELLFERN_WEBHOOKS_DELIVERY_CONCURRENCY": "16",
    }

    log = (tmp_path / "worker.log").open("ab")
    request.addfinalizer(log.close)

    async def start_worker() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.cli", "worker", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip

    first = await start_worker()
    await receiver.wait_for(lambda _: len(receiver.at("/load")) >= 40, timeout=30)
    first.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(first.wait(), 30) == 0
    stopped_at = len(receiver.at("/load"))
    assert stopped_at < len(sent), "the worker finished everything before SIGTERM"

    second = await start_worker()
    try:
        await receiver.wait_for(lambda _: len(receiver.at("/load")) >= len(sent), timeout=60)
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 30) == 0
    ids = Counter(r.headers["webhook-id"] for r in receiver.at("/load"))
    assert set(ids) == set(sent), "an event was lost"
    assert max(ids.values()) == 1, "an event was delivered twice after a graceful stop"
    page = await _count_succeeded(database_url, webhook.id)
    assert page == len(sent)


async def _count_succeeded(database_url: str, webhook_id: str) -> int:
    from worker.store import database  # noqa: PLC0415

    engine = database.create_engine(database_url)
    try:
        store = Store(engine)
        total, cursor = 0, None
        while True:
            page = await store.attempts.list(webhook_id, 100, cursor, success=True)
            total += len(page.data)
            if not page.has_more:
                return total
            cursor = page.next_cursor
    finally:
        await engine.dispose()


async def test_endpoint_failing_past_the_bound_is_disabled(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    async def broken(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(status=500)

    receiver.behaviours["/broken"] = broken
    # A failure run of 0.5 s stands in for the production 5 days.
    service = await service_factory(auto_disable_after_seconds=0.5, retry_schedule="0.3,0.3,0.3")
    webhook = await _webhook(service, receiver.url("/broken"), ["order.created"])
    await publish_event(broker, "order.created", service.org, {})
    body = await _disabled(service, webhook["id"])
    assert "failed for" in str(body["disabled_reason"])
    # At least this one: the service shares its session's queues and database, and may also
    # disable an earlier test's failing endpoint whose retries it consumes.
    disabled = service.running.metrics.endpoints_disabled.labels("failing")

    async def counted() -> bool:  # counted just after the endpoint's row is written
        return bool(disabled._value.get() >= 1)

    await eventually(counted, timeout=5, what="the disabled endpoint counted")


async def test_retention_prunes_old_events_and_attempts(store: Store, org: str) -> None:
    webhook = await store.endpoints.create(
        org, "https://example.com/h", ["order.created"], "", enabled=True
    )
    now = datetime.now(UTC)
    old, recent = f"evt_old{os.urandom(4).hex()}", f"evt_new{os.urandom(4).hex()}"
    for event_id in (old, recent):
        event = {"id": event_id, "type": "order.created", "organization_id": org,
                 "occurred_at": now.isoformat(), "data": {}}  # fmt: skip
        await store.pipeline.write_batch([NewEvent(event, now, (webhook.id,))])
    async with store.engine.begin() as connection:
        await connection.execute(
            tables.events.update()
            .where(tables.events.c.id == old)
            .values(received_at=now - timedelta(days=40))
        )
    pruned_events, _ = await store.events.prune(now - timedelta(days=30))
    assert pruned_events == 1
    assert await store.events.get(old) is None
    assert await store.events.get(recent) is not None
    assert await store.events.delivery_state(old, webhook.id) is None
    assert await store.events.delivery_state(recent, webhook.id) == "pending"


async def test_parked_deliveries_of_a_worker_gone_are_released_by_another(
    service_factory: ServiceFactory, receiver: Receiver
) -> None:
    first = await service_factory()
    webhook = await _webhook(first, receiver.url("/adopted"), ["order.created"])
    now = datetime.now(UTC)
    event_ids = [f"evt_adopt{i}{os.urandom(4).hex()}" for i in range(3)]
    # As a worker leaves them when it parks deliveries and then dies.
    await first.store.pipeline.write_batch(
        [
            NewEvent(
                {
                    "id": event_id,
                    "type": "order.created",
                    "organization_id": first.org,
                    "occurred_at": now.isoformat(),
                    "data": {},
                },
                now,
                (webhook["id"],),
                frozenset({webhook["id"]}),
            )
            for event_id in event_ids
        ]
    )
    await service_factory()  # a worker starting looks for parked deliveries at once
    await receiver.wait_for(lambda _: len(receiver.at("/adopted")) == 3, timeout=20)
    assert sorted(r.headers["webhook-id"] for r in receiver.at("/adopted")) == sorted(event_ids)

    async def recorded() -> bool:
        states = {await first.store.events.delivery_state(e, webhook["id"]) for e in event_ids}
        return states == {"succeeded"}

    await eventually(recorded, what="the released deliveries recorded")
