"""Ordered endpoints: one attempt at a time, in the order the service received the events, and
a failing event holds the ones after it until it succeeds or fails for good."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest
import sqlalchemy as sa
from aiohttp import web

from schemas.publish import build_event, publish_event
from tests.conftest import Receiver, Service, ServiceFactory, eventually
from worker.pipeline import topology
from worker.pipeline.tasks import encode_task, task_headers
from worker.store.records import NewEvent
from worker.store.tables import deliveries, events

pytestmark = pytest.mark.timeout(120)

EVENTS = 60
FAILING = 20  # the index of the event whose first two attempts fail
SCHEDULE = (0.3, 0.3)  # three attempts in all: the third of the failing event succeeds


class Line:
    """What the receiver saw: each request's event index, and how many were open at once."""

    def __init__(self, fail: dict[int, int], answer_after: float = 0.002) -> None:
        self.fail = fail  # event index -> how many of its attempts to answer 500
        # Long enough for a second attempt to overlap this one, if the service sent one.
        self.answer_after = answer_after
        self.order: list[tuple[int, int]] = []  # (event index, status answered)
        self.open = 0
        self.most_open = 0

    async def handle(self, request: web.Request, _seen: int) -> web.Response:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            index = int(json.loads(await request.read())["data"]["i"])
            await asyncio.sleep(self.answer_after)
            tried = sum(1 for i, _ in self.order if i == index)
            status = 500 if tried < self.fail.get(index, 0) else 200
            self.order.append((index, status))
            return web.Response(status=status)
        finally:
            self.open -= 1

    def first_successes(self) -> list[int]:
        seen: list[int] = []
        for index, status in self.order:
            if status == 200 and index not in seen:
                seen.append(index)
        return seen


async def _ordered_endpoint(service: Service, receiver: Receiver, path: str, line: Line) -> str:
    receiver.behaviours[path] = line.handle
    status, body = await service.call(
        "POST",
        "/webhooks",
        {"url": receiver.url(path), "events": ["order.created"], "ordered": True},
    )
    assert status == 201, body
    assert body["ordered"] is True
    return str(body["id"])


async def _states(service: Service, webhook_id: str) -> dict[str, int]:
    query = (
        sa.select(deliveries.c.state, sa.func.count())
        .where(deliveries.c.webhook_id == webhook_id)
        .group_by(deliveries.c.state)
    )
    async with service.store.engine.connect() as connection:
        return {state: int(n) for state, n in await connection.execute(query)}


async def _parked(service: Service, webhook_id: str) -> set[int]:
    """The indexes of the events whose deliveries are parked."""
    query = (
        sa.select(events.c.payload)
        .join(deliveries, deliveries.c.event_id == events.c.id)
        .where(deliveries.c.webhook_id == webhook_id, deliveries.c.state == "parked")
    )
    async with service.store.engine.connect() as connection:
        return {int(payload["data"]["i"]) for (payload,) in await connection.execute(query)}


async def test_an_ordered_endpoint_gets_one_event_at_a_time_and_a_failure_holds_the_rest(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    service = await service_factory(retry_schedule=SCHEDULE)
    line = Line(fail={FAILING: 2})
    webhook_id = await _ordered_endpoint(service, receiver, "/ordered", line)
    # Published one after the other, each confirmed: the order the service receives them in.
    for i in range(EVENTS):
        await publish_event(broker, "order.created", service.org, {"i": i})

    async def all_delivered() -> bool:
        return len(line.first_successes()) == EVENTS

    await eventually(all_delivered, timeout=60, what="every event delivered")
    assert line.most_open == 1, "two attempts to an ordered endpoint were open at once"
    assert line.first_successes() == list(range(EVENTS))
    # The failing event was tried three times, and nothing after it went before its success.
    tries = [(i, status) for i, status in line.order if i >= FAILING]
    assert tries[:3] == [(FAILING, 500), (FAILING, 500), (FAILING, 200)]

    async def recorded() -> bool:  # the last records commit just after their answers
        return await _states(service, webhook_id) == {"succeeded": EVENTS}

    await eventually(recorded, timeout=10, what="every delivery recorded succeeded")


async def test_an_event_that_fails_for_good_lets_the_next_go(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    service = await service_factory(retry_schedule=SCHEDULE)
    line = Line(fail={3: 99})
    webhook_id = await _ordered_endpoint(service, receiver, "/ordered-fail", line)
    for i in range(8):
        await publish_event(broker, "order.created", service.org, {"i": i})

    async def settled() -> bool:
        return await _states(service, webhook_id) == {"succeeded": 7, "failed": 1}

    await eventually(settled, timeout=60, what="seven delivered, one failed for good")
    assert line.first_successes() == [0, 1, 2, 4, 5, 6, 7]
    assert [status for i, status in line.order if i == 3] == [500, 500, 500]
    assert line.order.index((4, 200)) > max(n for n, (i, _) in enumerate(line.order) if i == 3)


async def test_pausing_an_ordered_endpoint_keeps_its_backlog_in_order_for_when_it_resumes(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    service = await service_factory(retry_schedule=SCHEDULE)
    line = Line(fail={}, answer_after=0.05)
    webhook_id = await _ordered_endpoint(service, receiver, "/ordered-pause", line)
    for i in range(30):
        await publish_event(broker, "order.created", service.org, {"i": i})

    async def some_delivered() -> bool:
        return len(line.first_successes()) >= 3

    await eventually(some_delivered, timeout=30, what="the first deliveries")
    status, _ = await service.call("PATCH", f"/webhooks/{webhook_id}", {"enabled": False})
    assert status == 200
    paused_at = len(line.order)
    await asyncio.sleep(1.5)
    # At most the attempt that was under way when the PATCH returned.
    assert len(line.order) <= paused_at + 1
    backlog = await _states(service, webhook_id)
    assert backlog.get("parked", 0) >= 10, backlog
    status, _ = await service.call("PATCH", f"/webhooks/{webhook_id}", {"enabled": True})
    assert status == 200

    async def all_delivered() -> bool:
        return len(line.first_successes()) == 30

    await eventually(all_delivered, timeout=30, what="the rest delivered after the resume")
    assert line.first_successes() == list(range(30))
    assert line.most_open == 1


async def test_an_endpoint_made_ordered_has_its_parked_backlog_sent_by_its_lane_alone(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    service = await service_factory(retry_schedule=SCHEDULE, endpoint_concurrency=2)
    line = Line(fail={}, answer_after=0.4)  # slow: at its cap, its new deliveries are parked
    receiver.behaviours["/made-ordered"] = line.handle
    status, body = await service.call(
        "POST", "/webhooks", {"url": receiver.url("/made-ordered"), "events": ["order.created"]}
    )
    assert status == 201, body
    webhook_id = str(body["id"])
    for i in range(2):  # measured slow first
        await publish_event(broker, "order.created", service.org, {"i": i})

    async def measured() -> bool:
        return len(line.first_successes()) == 2

    await eventually(measured, timeout=30, what="the first two delivered")
    # Queued as tasks: two of them take both its slots, the others are deferred to the broker.
    for i in range(2, 8):
        await publish_event(broker, "order.created", service.org, {"i": i})

    async def full() -> bool:
        return line.open == 2

    await eventually(full, timeout=30, what="both slots taken")
    for i in range(8, 30):  # parked, the sweeper sending them two at a time
        await publish_event(broker, "order.created", service.org, {"i": i})

    async def swept() -> bool:
        return any(i >= 8 for i, _ in line.order)

    await eventually(swept, timeout=30, what="the parked backlog being swept")
    backlog = await _parked(service, webhook_id)
    status, body = await service.call("PATCH", f"/webhooks/{webhook_id}", {"ordered": True})
    assert status == 200, body
    line.answer_after = 0.1
    # The attempts under way when the change arrived end; after that, only the lane sends: the
    # backlog in order, and each task that comes round joins it (wherever the lane is by then).
    await asyncio.sleep(0.7)
    switched = len(line.order)
    line.most_open = line.open

    async def all_delivered() -> bool:
        return len(line.first_successes()) == 30

    await eventually(all_delivered, timeout=60, what="the rest delivered")
    assert line.most_open == 1, "the backlog was still sent beside the lane, several at once"
    after = [i for i, _ in line.order[switched:] if i in backlog]
    assert len(after) >= 5, "the backlog was sent before the change"
    assert after == sorted(after), "the backlog was not sent in order once ordered"

    async def recorded() -> bool:
        return await _states(service, webhook_id) == {"succeeded": 30}

    await eventually(recorded, timeout=10, what="every delivery recorded succeeded")


async def test_a_task_queued_before_its_endpoint_turned_ordered_waits_for_its_turn_in_the_lane(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    service = await service_factory(retry_schedule=SCHEDULE)
    line = Line(fail={})
    webhook_id = await _ordered_endpoint(service, receiver, "/ordered-task", line)
    # Two events as fan-out stored them: the first parked, for the lane; the second pending,
    # its task queued while the endpoint was not yet ordered.
    first, second = (build_event("order.created", service.org, {"i": i}) for i in range(2))
    for envelope, parked in ((first, {webhook_id}), (second, set())):
        stored = NewEvent(
            envelope.model_dump(mode="json"), envelope.occurred_at, (webhook_id,), frozenset(parked)
        )
        await service.store.pipeline.write_batch([stored])
    body = encode_task(second.id, webhook_id, 1, second.model_dump_json().encode())
    channel = await broker.channel(publisher_confirms=True)
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(body, headers=task_headers(webhook_id)),
            routing_key=topology.DELIVERIES_QUEUE,
        )
    finally:
        await channel.close()

    async def both_delivered() -> bool:
        return len(line.first_successes()) == 2

    await eventually(both_delivered, timeout=30, what="both delivered")
    # The task did not overtake the backlog: its delivery joined it, and the lane sent it.
    assert line.order == [(0, 200), (1, 200)]

    async def recorded() -> bool:
        return await _states(service, webhook_id) == {"succeeded": 2}

    await eventually(recorded, timeout=10, what="both recorded succeeded")
