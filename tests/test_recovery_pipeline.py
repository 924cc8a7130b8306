"""A recovery, end to end: what an outage made an endpoint miss is sent again by the worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from aiohttp import web

from schemas.publish import publish_event
from tests.conftest import Receiver, ServiceFactory, eventually

pytestmark = pytest.mark.timeout(90)


async def test_a_recovery_resends_the_failed_deliveries_with_the_same_webhook_id(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    outage = True

    async def down_then_up(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(status=503 if outage else 200)

    receiver.behaviours["/outage"] = down_then_up
    service = await service_factory(retry_schedule=(0.2,), retry_jitter=0)
    status, webhook = await service.call(
        "POST", "/webhooks", {"url": receiver.url("/outage"), "events": ["order.created"]}
    )
    assert status == 201
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    sent = [
        (await publish_event(broker, "order.created", service.org, {"i": i})).id for i in range(20)
    ]

    async def all_failed() -> bool:
        states = [await service.store.events.delivery_state(e, webhook["id"]) for e in sent]
        return states == ["failed"] * len(sent)

    await eventually(all_failed, what="every delivery failed for good")
    assert len(receiver.at("/outage")) == 40  # the first attempt and one retry each

    outage = False
    status, recovery = await service.call(
        "POST", f"/webhooks/{webhook['id']}/recover", {"since": since}
    )
    assert status == 202, recovery
    assert recovery["total"] == 20

    async def all_succeeded() -> bool:
        states = [await service.store.events.delivery_state(e, webhook["id"]) for e in sent]
        return states == ["succeeded"] * len(sent)

    await eventually(all_succeeded, timeout=30, what="every delivery recovered")
    resent = receiver.at("/outage")[40:]
    assert sorted(r.headers["webhook-id"] for r in resent) == sorted(sent)
    status, done = await service.call(
        "GET", f"/webhooks/{webhook['id']}/recoveries/{recovery['id']}"
    )
    assert (done["state"], done["queued"]) == ("done", 20)
    # Each is the third attempt of its (event, endpoint).
    status, listing = await service.call(
        "GET", f"/webhooks/{webhook['id']}/deliveries?status=succeeded&limit=100"
    )
    assert sorted(a["attempt"] for a in listing["data"]) == [3] * 20
    recovered = service.running.metrics.deliveries_recovered._value.get()
    assert recovered == 20
