"""Fewer duplicates: work that may have been done already is checked against the store first.

A task released from the parked backlog again (a sweep cut short by a crash releases what it
had already published) or redelivered by the broker (recorded but not acked before a crash) is
settled unsent when the store has its delivery succeeded, and sent when it has not.
"""

from __future__ import annotations

import json

import aio_pika
import pytest

from schemas.publish import publish_event
from tests.conftest import Receiver, ServiceFactory, eventually
from worker.pipeline import topology
from worker.pipeline.tasks import encode_task, task_headers

pytestmark = pytest.mark.timeout(60)


async def _queue_task(
    broker: aio_pika.abc.AbstractRobustConnection,
    event: dict[str, object],
    webhook_id: str,
    *,
    released: bool,
) -> None:
    headers = task_headers(webhook_id)
    if released:
        headers[topology.RELEASED_HEADER] = True
    body = encode_task(str(event["id"]), webhook_id, 2, json.dumps(event).encode())
    channel = await broker.channel(publisher_confirms=True)
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=topology.DELIVERIES_QUEUE,
        )
    finally:
        await channel.close()


async def test_a_released_task_of_a_delivery_that_succeeded_is_not_sent_again(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    service = await service_factory()
    status, webhook = await service.call(
        "POST", "/webhooks", {"url": receiver.url("/once"), "events": ["order.created"]}
    )
    assert status == 201
    envelope = await publish_event(broker, "order.created", service.org, {"n": 1})
    await receiver.wait_for(lambda r: len([x for x in r if x.path == "/once"]) == 1)

    async def recorded() -> bool:  # the first attempt is sent while its event is written
        state = await service.store.events.delivery_state(envelope.id, webhook["id"])
        return state == "succeeded"

    await eventually(recorded, timeout=10, what="the delivery recorded succeeded")
    event = await service.store.events.get(envelope.id)
    assert event is not None
    skipped = service.running.metrics.already_recorded
    before = skipped._value.get()

    # The same delivery released again: the store has it succeeded, so nothing is sent.
    await _queue_task(broker, event, webhook["id"], released=True)

    async def settled_unsent() -> bool:
        return bool(skipped._value.get() >= before + 1)

    await eventually(settled_unsent, timeout=10, what="the released task settled unsent")
    assert len(receiver.at("/once")) == 1

    # A plain task (a manual redelivery's kind, neither released nor redelivered) is sent.
    await _queue_task(broker, event, webhook["id"], released=False)
    await receiver.wait_for(lambda r: len([x for x in r if x.path == "/once"]) == 2)
    assert skipped._value.get() == before + 1
