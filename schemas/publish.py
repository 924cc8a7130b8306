"""Publish helper for upstream Python services.

    async with await aio_pika.connect_robust(url) as connection:
        await publish_event(connection, "order.created", "org_acme", {"order_id": "ord_1"})

With a RabbitMQ cluster, ``schemas.amqp.connect_robust("amqp://…@node1/,amqp://…@node2/")``
gives a connection that moves to another node by itself when its node stops; a publish
under way meanwhile is confirmed by the next node or raises :class:`PublishError`.

The event goes to the durable topic exchange ``sellfern.events`` with the event type as
routing key, persistent and mandatory, and the call returns only once the broker has
confirmed it. It raises :class:`PublishError` — never hangs — when the broker cannot be
reached in time, refuses the message, or has no queue bound for it.

When the caller is inside an OpenTelemetry span, its context goes with the event as the AMQP
headers ``traceparent`` (and ``tracestate``), and the service's spans and the receiver's
request continue that trace.
"""

from __future__ import annotations

import asyncio
import weakref
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, HeadersType
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pamqp.commands import Basic

from schemas.amqp import connect_first, node_urls
from schemas.events import EventEnvelope, new_event_id

EVENTS_EXCHANGE = "sellfern.events"
# W3C Trace Context whatever propagators the publisher has configured: it is the contract.
_W3C = TraceContextTextMapPropagator()


class PublishError(Exception):
    """The event was not confirmed by the broker; it may be published again safely."""


def trace_headers() -> dict[str, str]:
    """The current span's context as W3C headers (``traceparent``, and ``tracestate`` when it
    has one); empty outside a span."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier


def build_event(
    event_type: str,
    organization_id: str,
    data: dict[str, Any],
    *,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> EventEnvelope:
    """Build and validate an envelope (raises pydantic's ValidationError when invalid)."""
    return EventEnvelope.model_validate(
        {
            "id": event_id or new_event_id(),
            "type": event_type,
            "organization_id": organization_id,
            "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(timespec="milliseconds"),
            "data": data,
        }
    )


async def publish_envelope(
    connection: AbstractConnection, envelope: EventEnvelope, *, timeout: float = 10.0
) -> None:
    """Publish one envelope and wait for the broker's confirm."""
    body = envelope.model_dump_json().encode()
    headers: HeadersType = dict(trace_headers())
    message = aio_pika.Message(
        body,
        message_id=envelope.id,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=datetime.now(UTC),
        headers=headers,
    )
    try:
        async with asyncio.timeout(timeout):
            exchange = await _confirming_exchange(connection)
            confirmation = await exchange.publish(
                message, routing_key=envelope.type, mandatory=True
            )
    except TimeoutError:
        raise PublishError(f"no confirm from the broker within {timeout:g}s") from None
    except aio_pika.exceptions.DeliveryError as exc:
        raise PublishError(f"the broker returned the event as unroutable: {exc}") from None
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
        raise PublishError(f"broker error: {exc!r}") from None
    except RuntimeError as exc:
        # aiormq's "<Connection …> closed" and ChannelInvalidStateError: a robust connection
        # between reconnects, or a channel closed under the publish.
        raise PublishError(f"broker connection lost: {exc}") from None
    if not isinstance(confirmation, Basic.Ack):
        raise PublishError(f"the broker did not accept the event: {confirmation!r}")


# One confirming channel per connection, opened at its first publish and kept: opening a
# channel, declaring the exchange and closing the channel again would cost three round trips
# more than each publish itself. Publishes share it, each awaiting its own confirm; once it
# is closed (a channel error, or a connection lost and not restored), the next one opens
# another. A robust connection restores it with itself after a reconnect.
_CHANNELS: weakref.WeakKeyDictionary[
    AbstractConnection, tuple[AbstractChannel, AbstractExchange]
] = weakref.WeakKeyDictionary()
_OPENING: weakref.WeakKeyDictionary[AbstractConnection, asyncio.Lock] = weakref.WeakKeyDictionary()


async def _confirming_exchange(connection: AbstractConnection) -> AbstractExchange:
    cached = _CHANNELS.get(connection)
    if cached is not None and not cached[0].is_closed:
        return cached[1]
    async with _OPENING.setdefault(connection, asyncio.Lock()):
        cached = _CHANNELS.get(connection)
        if cached is not None and not cached[0].is_closed:
            return cached[1]
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Idempotent; lets a publisher start before the service has declared it.
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        _CHANNELS[connection] = (channel, exchange)
        return exchange


async def publish_event(
    connection: AbstractConnection,
    event_type: str,
    organization_id: str,
    data: dict[str, Any],
    *,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
    timeout: float = 10.0,
) -> EventEnvelope:
    """Validate, publish and confirm one event; return the envelope that was sent."""
    envelope = build_event(
        event_type, organization_id, data, event_id=event_id, occurred_at=occurred_at
    )
    await publish_envelope(connection, envelope, timeout=timeout)
    return envelope


async def connect(url: str, *, timeout: float = 10.0) -> AbstractConnection:
    """Open a connection, failing with :class:`PublishError` instead of waiting forever.

    ``url`` may list the nodes of a cluster, comma-separated: they are tried in turn, all
    within ``timeout``.
    """
    try:
        if len(node_urls(url)) <= 1:
            return await asyncio.wait_for(aio_pika.connect(url.strip()), timeout)
        return await asyncio.wait_for(connect_first(url), timeout)
    except TimeoutError:
        raise PublishError(f"broker not reachable within {timeout:g}s") from None
    except (aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
        raise PublishError(f"broker not reachable: {exc}") from None
