"""Retry jitter: a burst that failed together comes back spread over the tiers around its delay."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

import aio_pika
import pytest
from aiohttp import web

from schemas.publish import publish_event
from tests.conftest import Receiver, ServiceFactory
from worker.pipeline.outcome import jitter_tiers

pytestmark = pytest.mark.timeout(120)

BURST = 1_000
# Long enough that the service's own time to work through the burst (about a second here) is
# small beside the spread being measured (±1 s).
DELAY = 5.0


async def test_a_thousand_retries_scheduled_at_once_are_spread(
    service_factory: ServiceFactory,
    receiver: Receiver,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    first_seen: dict[str, float] = {}
    gaps: list[float] = []
    done = asyncio.Event()

    async def fail_once(request: web.Request, _seen: int) -> web.Response:
        """500 to an event's first attempt, 200 to its retry; note when each came."""
        now = time.monotonic()
        event_id = request.headers["webhook-id"]
        if event_id not in first_seen:
            first_seen[event_id] = now
            return web.Response(status=500)
        gaps.append(now - first_seen[event_id])
        if len(gaps) == BURST:
            done.set()
        return web.Response()

    receiver.behaviours["/jitter"] = fail_once
    service = await service_factory(
        retry_schedule=(DELAY,), retry_jitter=0.2, endpoint_concurrency=256
    )
    status, _ = await service.call(
        "POST", "/webhooks", {"url": receiver.url("/jitter"), "events": ["order.created"]}
    )
    assert status == 201
    await asyncio.gather(
        # A thousand confirms at once can take more than publish_event's default 10 s when the
        # machine is busy with other tests; the spread measured below does not depend on it.
        *(
            publish_event(broker, "order.created", service.org, {"i": i}, timeout=60)
            for i in range(BURST)
        )
    )
    await asyncio.wait_for(done.wait(), 60)

    # Every retry went to one of the five tiers around its delay, and each took its share.
    tiers = jitter_tiers(DELAY, 0.2)
    assert tiers == (4.0, 4.5, 5.0, 5.5, 6.0)
    scheduled = service.running.metrics.retries_scheduled
    per_tier = Counter({tier: scheduled.labels(f"{tier:g}")._value.get() for tier in tiers})
    # At least once: a rare duplicate (a message redelivered under load) schedules one more.
    assert BURST <= sum(per_tier.values()) <= BURST + 5
    for tier in tiers:
        assert 120 <= per_tier[tier] <= 280, per_tier  # 200 expected each; ±80 is > 6 sigma

    # What the receiver saw: the gap between an event's two attempts is its tier plus the
    # service's own time, so the retries come back spread over about 2 s, not at once. The
    # service's time shifts every gap alike (more on a loaded machine), so the spread is
    # measured between the gaps, not against the tiers' own values.
    gaps.sort()
    low, high = gaps[len(gaps) // 20], gaps[-len(gaps) // 20]
    assert gaps[0] >= 4.0
    assert high - low > 1.5, (low, high)
    assert statistics.pstdev(gaps) > 0.5
