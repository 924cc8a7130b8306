"""Fewer duplicates: work that may have been done already is checked against the store first.

Every task is: one the broker redelivered (recorded but not acked before a crash), or a second
task of one delivery (its event fanned out again after a crash, while the first task was still
queued), is settled unsent when the store has its delivery succeeded, and sent when it has not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aio_pika
import aiohttp
import pytest
from aiohttp import web

from schemas.publish import build_event, publish_envelope, publish_event
from tests.conftest import (
    Receiver,
    Service,
    ServiceFactory,
    eventually,
    make_settings,
    run_service,
)
from worker.pipeline import topology
from worker.pipeline.tasks import encode_task, task_headers
from worker.store.records import NewEvent

pytestmark = pytest.mark.timeout(60)


async def _queue_task(
    broker: aio_pika.abc.AbstractRobustConnection,
    event: dict[str, object],
    webhook_id: str,
) -> None:
    headers = task_headers(webhook_id)
    body = encode_task(str(event["id"]), webhook_id, 2, json.dumps(event).encode())
    channel = await broker.channel(publisher_confirms=True)
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=topology.DELIVERIES_QUEUE,
        )
    finally:
        await channel.close()


async def test_a_task_is_sent_only_while_its_delivery_has_not_succeeded(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    # A retry far off, so that only the tasks this test queues come round meanwhile.
    service = await service_factory(retry_schedule="30")
    webhooks = {}
    for path in ("/once", "/flaky"):
        status, webhooks[path] = await service.call(
            "POST", "/webhooks", {"url": receiver.url(path), "events": ["order.created"]}
        )
        assert status == 201

    async def first_fails(_request: web.Request, seen: int) -> web.StreamResponse:
        return web.Response(status=503 if seen == 0 else 200)

    receiver.behaviours["/flaky"] = first_fails
    envelope = await publish_event(broker, "order.created", service.org, {"n": 1})

    async def recorded() -> bool:  # the first attempts are sent while their event is written
        states = [
            await service.store.events.delivery_state(envelope.id, webhooks[path]["id"])
            for path in ("/once", "/flaky")
        ]
        return states == ["succeeded", "pending"]

    await eventually(recorded, timeout=10, what="one delivery succeeded, one failed once")
    event = await service.store.events.get(envelope.id)
    assert event is not None
    skipped = service.running.metrics.already_recorded
    before = skipped._value.get()

    # A second task of the delivery that succeeded (its event fanned out again after a
    # crash, say): the store has it succeeded, so nothing is sent.
    await _queue_task(broker, event, webhooks["/once"]["id"])

    async def settled_unsent() -> bool:
        return bool(skipped._value.get() >= before + 1)

    await eventually(settled_unsent, timeout=10, what="the second task settled unsent")
    assert len(receiver.at("/once")) == 1

    # A task of the delivery that has not succeeded is sent.
    await _queue_task(broker, event, webhooks["/flaky"]["id"])
    await receiver.wait_for(lambda r: len([x for x in r if x.path == "/flaky"]) == 2)
    assert skipped._value.get() == before + 1


async def test_a_retry_that_comes_round_before_its_attempt_is_recorded_is_sent(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    # A loaded worker may publish a retry and see it come back before the failed attempt that
    # scheduled it is recorded; it stands here for the retry: a task of attempt 2 while attempt
    # 1 of the same delivery is still under way. Only another task of attempt 1 is a duplicate.
    service = await service_factory(retry_schedule="30")
    status, webhook = await service.call(
        "POST", "/webhooks", {"url": receiver.url("/slow-first"), "events": ["order.created"]}
    )
    assert status == 201
    arrived, release = asyncio.Event(), asyncio.Event()

    async def first_hangs(_request: web.Request, seen: int) -> web.StreamResponse:
        if seen == 0:
            arrived.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 4)
        return web.Response(status=200)

    receiver.behaviours["/slow-first"] = first_hangs
    envelope = await publish_event(broker, "order.created", service.org, {"n": 1})
    await asyncio.wait_for(arrived.wait(), 10)

    async def stored() -> bool:  # the first attempt is sent while its event is written
        return await service.store.events.get(envelope.id) is not None

    await eventually(stored, timeout=10, what="the event stored")
    event = await service.store.events.get(envelope.id)
    assert event is not None
    await _queue_task(broker, event, webhook["id"])  # attempt 2, while attempt 1 hangs
    try:
        # Answered at once, while the first still hangs (a request is listed once answered).
        await receiver.wait_for(lambda r: any(x.path == "/slow-first" for x in r), timeout=3)
    finally:
        release.set()
    assert service.running.metrics.already_recorded._value.get() == 0


async def test_a_redelivered_event_whose_delivery_has_no_attempt_recorded_is_not_stranded(
    database_url: str,
    amqp_url: str,
    ca_bundle: str,
    org: str,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    # A worker stored an event, its delivery still pending, and sent the first attempt; then the
    # database failed the attempt's record and the event went back to the broker. Fanned out
    # again, the delivery is offered again, and this time the scheduler parks it (here because
    # the endpoint is ordered; under load, because its endpoint has a parked backlog). The
    # delivery must end up parked, for the sweeper or the ordered lane to send it: left
    # pending, with no attempt and no task, nothing would ever send it.
    settings = make_settings(database_url, amqp_url, ca_bundle)
    async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        running = await stack.enter_async_context(run_service(settings, role="api"))
        _, token = await running.store.tokens.create(org, ("webhooks:manage",), "test")
        api = Service(running, http, token, org)
        status, webhook = await api.call(
            "POST",
            "/webhooks",
            {"url": receiver.url("/again"), "events": ["order.created"], "ordered": True},
        )
        assert status == 201
        envelope = build_event("order.created", org, {"n": 1})
        await running.store.pipeline.write_batch(
            [
                NewEvent(
                    envelope.model_dump(mode="json"), envelope.occurred_at, (webhook["id"],),
                    frozenset(),
                )
            ]
        )  # fmt: skip
        assert await running.store.events.delivery_state(envelope.id, webhook["id"]) == "pending"

        await publish_envelope(broker, envelope)
        channel = await broker.channel()
        queue = await channel.get_queue(topology.EVENTS_QUEUE, ensure=False)
        taken = await queue.get(no_ack=False, timeout=10)
        assert json.loads(taken.body)["id"] == envelope.id
        await channel.close()  # unacked: the broker requeues it, marked redelivered

        await stack.enter_async_context(run_service(settings, role="worker"))
        await receiver.wait_for(lambda r: any(x.path == "/again" for x in r), timeout=20)
        assert [r.headers["webhook-id"] for r in receiver.at("/again")] == [envelope.id]

        async def recorded() -> bool:
            state = await running.store.events.delivery_state(envelope.id, webhook["id"])
            return state == "succeeded"

        await eventually(recorded, what="the delivery recorded")
