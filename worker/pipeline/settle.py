"""Consume and settle: the one place where both consumers ack, requeue or give up a message.

A message is acked when its handler returns (in runs, :mod:`worker.pipeline.acks`) and
rejected with requeue when it raises or is cancelled, so no path forgets to settle. A handler
that fails while the database is unreachable is kept unacked and run again once the database
is back; a failure with the database up is requeued after a short back-off, and after
``DELIVERY_LIMIT`` redeliveries RabbitMQ moves the message to ``webhooks.dead``, so a poison
message cannot loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from aiormq.abc import AbstractChannel

from worker.pipeline.acks import AckWindow
from worker.pipeline.consuming import Delivered

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
        self._channel: AbstractChannel | None = None
        self._acks: AckWindow | None = None

    def _window(self, channel: AbstractChannel) -> AckWindow:
        """The ack window of the channel the consumer reads now (a new one after a
        reconnect: its delivery tags start again)."""
        if self._acks is None or channel is not self._channel:
            self._channel = channel

            async def send(tag: int, *, multiple: bool) -> None:
                await channel.basic_ack(tag, multiple=multiple, wait=False)

            self._acks = AckWindow(send)
        return self._acks

    async def settle(self, message: Delivered, handle: Callable[[], Awaitable[None]]) -> None:
        channel = message.channel
        if channel.is_closed:
            return  # its channel closed before it was taken up: the broker redelivers it
        acks = self._window(channel)
        tag = message.delivery_tag or 0
        acks.received(tag)
        try:
            await riding_out_database_outages(self._ping, handle)
        except Exception:
            log.exception("handling failed; the message will be redelivered", stage=self._stage)
            await asyncio.sleep(REQUEUE_BACKOFF_SECONDS)
            await self._requeue(message, acks, tag)
            return
        except BaseException:
            # Cut short (the worker stops): back to the queue now, not when the channel closes.
            await self._requeue(message, acks, tag)
            raise
        acks.finished(tag)

    async def flushed(self) -> None:
        """Return once the acks of every message handled so far are written."""
        if self._acks is not None:
            await self._acks.flushed()

    @staticmethod
    async def _requeue(message: Delivered, acks: AckWindow, tag: int) -> None:
        acks.rejected(tag)
        with contextlib.suppress(Exception):  # a closed channel requeues it all the same
            await message.channel.basic_reject(tag, requeue=True)
