"""The RabbitMQ topology, declared idempotently by every process at start-up.

::

    sellfern.events (topic) --#--> webhooks.events --fan-out--> webhooks.deliveries
    webhooks.retry.<delay>s --TTL, dead-letter--> webhooks.deliveries
    webhooks.deferred.<delay>s --TTL, dead-letter--> webhooks.deliveries
    invalid events, exhausted and poison tasks --> webhooks.dead
    webhooks.changes (fanout) --> one exclusive queue per worker, to invalidate caches

Every queue is a durable quorum queue. Retry tiers use one queue per distinct delay with a
uniform ``x-message-ttl`` because a per-message TTL only expires at the queue head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from worker.pipeline.outcome import jitter_tiers

EVENTS_EXCHANGE = "sellfern.events"
CHANGES_EXCHANGE = "webhooks.changes"
EVENTS_QUEUE = "webhooks.events"
DELIVERIES_QUEUE = "webhooks.deliveries"
DEAD_QUEUE = "webhooks.dead"
# How often a message may be redelivered after its handler failed before RabbitMQ dead-letters
# it: enough to ride out a restart or a database blip, few enough to stop a poison message.
DELIVERY_LIMIT = 5
# A task whose endpoint is at its concurrency cap waits in the broker before it is offered
# again: about as long as the endpoint needs for the tasks deferred before it, and longer
# each time it is put back. A slow endpoint's backlog then costs a republish or two per task
# instead of one a second, so the other endpoints keep the worker.
DEFER_TIERS: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)
# Header naming the task's endpoint, so the cap is checked before the body is even parsed.
WEBHOOK_HEADER = "x-webhook-id"
DEFERRALS_HEADER = "x-deferrals"


def retry_queue_name(delay: float) -> str:
    return f"webhooks.retry.{delay:g}s"


def deferred_queue_name(delay: float) -> str:
    return f"webhooks.deferred.{delay:g}s"


def _quorum(**arguments: Any) -> dict[str, Any]:  # noqa: ANN401 - AMQP table values
    return {"x-queue-type": "quorum", **arguments}


def _dead_letter_to(queue: str) -> dict[str, Any]:
    # Default exchange with the queue's name as routing key: straight to that queue.
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def _declare_delay_queue(channel: AbstractChannel, name: str, delay: float) -> str:
    """A queue whose messages all wait ``delay`` seconds, then return to the deliveries."""
    ttl_ms = max(1, round(delay * 1000))
    arguments = _quorum(**_dead_letter_to(DELIVERIES_QUEUE), **{"x-message-ttl": ttl_ms})
    await channel.declare_queue(name, durable=True, arguments=arguments)
    return name


@dataclass(frozen=True)
class Topology:
    events_exchange: AbstractExchange
    changes_exchange: AbstractExchange
    default_exchange: AbstractExchange
    events: AbstractQueue
    deliveries: AbstractQueue
    dead: AbstractQueue
    retry_queues: dict[float, str]

    @property
    def queue_names(self) -> list[str]:
        return [
            EVENTS_QUEUE,
            DELIVERIES_QUEUE,
            *(deferred_queue_name(delay) for delay in DEFER_TIERS),
            *self.retry_queues.values(),
            DEAD_QUEUE,
        ]


async def declare(
    channel: AbstractChannel, retry_schedule: Sequence[float], retry_jitter: float = 0.0
) -> Topology:
    """Declare exchanges and queues; safe to run any number of times by any process.

    Every retry delay gets its tiers around it (:func:`worker.pipeline.outcome.jitter_tiers`).
    """
    events_exchange = await channel.declare_exchange(
        EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    changes_exchange = await channel.declare_exchange(
        CHANGES_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(DEAD_QUEUE, durable=True, arguments=_quorum())
    poison_to_dead = {**_dead_letter_to(DEAD_QUEUE), "x-delivery-limit": DELIVERY_LIMIT}
    events = await channel.declare_queue(
        EVENTS_QUEUE, durable=True, arguments=_quorum(**poison_to_dead)
    )
    await events.bind(events_exchange, routing_key="#")
    deliveries = await channel.declare_queue(
        DELIVERIES_QUEUE, durable=True, arguments=_quorum(**poison_to_dead)
    )
    for delay in DEFER_TIERS:
        await _declare_delay_queue(channel, deferred_queue_name(delay), delay)
    retry_queues: dict[float, str] = {}
    tiers = {tier for delay in retry_schedule for tier in jitter_tiers(delay, retry_jitter)}
    for delay in sorted(tiers):
        retry_queues[delay] = await _declare_delay_queue(channel, retry_queue_name(delay), delay)
    return Topology(
        events_exchange=events_exchange,
        changes_exchange=changes_exchange,
        default_exchange=channel.default_exchange,
        events=events,
        deliveries=deliveries,
        dead=dead,
        retry_queues=retry_queues,
    )
