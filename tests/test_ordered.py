"""Ordered endpoints: one attempt at a time, in the order the service received the events, and
a failing event holds the ones after it until it succeeds or fails for good."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest
import sqlalchemy as sa
from aiohttp import web

from schemas.publish import publish_event
from tests.conftest import Receiver, Service, ServiceFactory, eventually
from worker.store.tables import deliveries

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
