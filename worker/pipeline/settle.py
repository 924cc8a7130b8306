"""Consume and settle: the one place where both consumers ack, requeue or give up a message.

``message.process`` acks when the handler returns and rejects with requeue when it raises, so
no path forgets to settle. A handler that fails while the database is unreachable is kept
unacked and run again once the database is back; a failure with the database up is requeued
after a short back-off, and after ``DELIVERY_LIMIT`` redeliveries RabbitMQ moves the message
to ``webhooks.dead``, so a poison message cannot loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from aio_pika.abc import AbstractIncomingMessage

log = structlog.get_logger("sellfern_webhooks.settle")

# Waits between probes of an unreachable database (the last one repeats).
DATABASE_PROBE_SECONDS = (0.5, 1.0, 2.0, 5.0)
# Pause before a failed message goes back, so that a broken dependency is not hammered.
REQUEUE_BACKOFF_SECONDS = 1.0

Ping = Callable[[], Awaitable[None]]


async def _reachable(ping: Ping) -> bool:
    try:
        await asyncio.wait_for(ping(), 5)
    except Exception:
        return False
    return True


async def riding_out_database_outages(ping: Ping, handle: Callable[[], Awaitable[None]]) -> None:
    """Run ``handle``; if it fails while the database is unreachable, wait for the database
    and run it again, keeping the message unacked meanwhile.

    Requeueing instead would count against the queue's ``DELIVERY_LIMIT`` once a second, and a
    ten-second database outage would dead-letter healthy events and tasks. A failure with the
    database up is raised, so that a poison message still ends in ``webhooks.dead``.
    """
    while True:
        try:
            await handle()
        except Exception:
            if await _reachable(ping):
                raise
            log.warning("database unreachable; the message is kept and retried when it is back")
            delays = iter(DATABASE_PROBE_SECONDS)
            while True:
                await asyncio.sleep(next(delays, DATABASE_PROBE_SECONDS[-1]))
                if await _reachable(ping):
                    break
        else:
            return


class Settler:
    """Runs a consumer's handler for one message and settles the message, in one place."""

    def __init__(self, ping: Ping, stage: str) -> None:
        self._ping = ping
        self._stage = stage

    async def settle(
        self, message: AbstractIncomingMessage, handle: Callable[[], Awaitable[None]]
    ) -> None:
        async with message.process(requeue=True, ignore_processed=True):
            try:
                await riding_out_database_outages(self._ping, handle)
            except Exception:
                log.exception("handling failed; the message will be redelivered", stage=self._stage)
                await asyncio.sleep(REQUEUE_BACKOFF_SECONDS)
                # Settled here rather than raised to process(), which would reject it just the
                # same but leave the consumer's task to end in an error logged twice more.
                await message.reject(requeue=True)
