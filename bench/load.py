"""Load generation: events as upstream services publish them, and the bare-client ceiling."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractConnection, AbstractExchange
from pamqp.commands import Basic

from schemas.events import EventEnvelope
from schemas.publish import EVENTS_EXCHANGE, PublishError, build_event
from worker.pipeline import signing
from worker.pipeline.sender import USER_AGENT, payload_body

Report = Callable[[str], None]
PUBLISH_WINDOW = 200  # confirmed publishes in flight
REPORT_EVERY = 2.0


def order_event(org: str, event_type: str = "order.created", n: int = 0) -> EventEnvelope:
    """A realistic, valid envelope of about 400 bytes."""
    return build_event(
        event_type,
        org,
        {
            "order_id": f"ord_{n:08d}",
            "status": "paid",
            "currency": "EUR",
            "total": "129.90",
            "customer": {"id": "cus_4711", "email": "buyer@example.com"},
            "lines": [
                {"sku": "SKU-1", "quantity": 2, "price": "49.95"},
                {"sku": "SKU-2", "quantity": 1, "price": "30.00"},
            ],
        },
    )


class EventPublisher:
    """Publishes envelopes exactly as ``schemas.publish.publish_envelope`` does — persistent,
    mandatory, routing key = type, confirmed — but on one long-lived channel with many
    publishes in flight, instead of one channel per event, so that the publisher is not what
    the benchmark measures.
    """

    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange

    @classmethod
    async def open(cls, connection: AbstractConnection) -> EventPublisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        return cls(exchange)

    async def publish(self, envelope: EventEnvelope) -> None:
        message = aio_pika.Message(
            envelope.model_dump_json().encode(),
            message_id=envelope.id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=datetime.now(UTC),
        )
        confirmation = await self._exchange.publish(
            message, routing_key=envelope.type, mandatory=True, timeout=30
        )
        if not isinstance(confirmation, Basic.Ack):
            raise PublishError(f"the broker did not accept the event: {confirmation!r}")

    async def publish_all(self, envelopes: Sequence[EventEnvelope], report: Report) -> float:
        """Publish every envelope, confirmed; return the seconds it took."""
        pending = iter(envelopes)
        done = 0

        async def pump() -> None:
            nonlocal done
            for envelope in pending:  # one shared iterator: each envelope goes out once
                await self.publish(envelope)
                done += 1

        started = time.monotonic()
        pumps = asyncio.gather(*(pump() for _ in range(min(PUBLISH_WINDOW, len(envelopes)))))
        while not pumps.done():
            await asyncio.wait([pumps], timeout=REPORT_EVERY)
            if not pumps.done():
                report(f"published {done}/{len(envelopes)}")
        await pumps
        elapsed = time.monotonic() - started
        report(f"published {len(envelopes)} events in {elapsed:.1f}s")
        return elapsed

    async def publish_paced(
        self, make: Callable[[int], EventEnvelope], rate: float, seconds: float, report: Report
    ) -> tuple[list[tuple[str, float]], float]:
        """Publish ``rate`` events a second for ``seconds``, on an absolute schedule.

        Returns (event id, occurred_at as Unix time) per event, and the seconds it took.
        """
        total = max(1, round(rate * seconds))
        sent: list[tuple[str, float]] = []
        in_flight: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        next_report = started + REPORT_EVERY
        for index in range(total):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            envelope = make(index)
            sent.append((envelope.id, envelope.occurred_at.timestamp()))
            task = asyncio.create_task(self.publish(envelope))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if time.monotonic() >= next_report:
                next_report += REPORT_EVERY
                report(f"published {index + 1}/{total} at {rate:g}/s")
        await asyncio.gather(*in_flight)
        return sent, time.monotonic() - started


def wire_events(envelopes: Iterable[EventEnvelope]) -> list[dict[str, Any]]:
    """The envelopes as the worker sees them: the JSON objects it receives."""
    return [json.loads(envelope.model_dump_json()) for envelope in envelopes]


async def bare_client(
    url: str, ca_file: Path, secret: str, events: Sequence[dict[str, Any]], concurrency: int
) -> tuple[int, int, float]:
    """POST each event's signed payload with a plain aiohttp client, ``concurrency`` at a time.

    Does per request what the worker's sender does (build the body, sign, POST, read the
    answer) and nothing else. Returns (succeeded, failed, seconds).
    """
    context = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
    ok = failed = 0
    pending = iter(events)

    async with aiohttp.ClientSession(
        connector=connector, headers={"user-agent": USER_AGENT}
    ) as session:

        async def client() -> None:
            nonlocal ok, failed
            for event in pending:
                body = payload_body(event)
                timestamp = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "webhook-id": event["id"],
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": signing.signature_header(
                        [secret], event["id"], timestamp, body
                    ),
                }
                async with session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        ok += 1
                    else:
                        failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return ok, failed, time.perf_counter() - started
