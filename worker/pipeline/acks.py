"""Acks in runs: one ``basic.ack`` with ``multiple`` for messages a consumer finished together.

A worker finishes its messages in bursts (one batch commit releases every handler waiting on
it), and mostly in the order it received them. Acking each one costs a frame, a write and a
future apiece; this window instead waits until the loop has run the burst's handlers, then
acks the run of finished messages at the head of what the channel holds with one
``multiple=True`` frame, and any other finished message on its own. ``multiple`` acks every
earlier message of the channel, so it is only sent for a run of which none is still open. No
finished message waits past that turn of the loop: what a consumer holds unacked, and so its
prefetch, is what it is working on.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

log = structlog.get_logger("sellfern_webhooks.acks")


class SendAck(Protocol):
    async def __call__(self, tag: int, *, multiple: bool) -> None:
        """``basic.ack`` of a delivery tag; with ``multiple``, of every open tag up to it."""


class AckWindow:
    """The open messages of one channel, in the order it delivered them, and their acks.

    A new window is made for a new channel (after a reconnect): delivery tags are a
    channel's own and start again at 1.
    """

    def __init__(self, send: SendAck) -> None:
        self._send = send
        # Delivered and neither acked nor rejected yet, in delivery (tag) order: a dict keeps
        # insertion order and removes from the middle at once.
        self._open: dict[int, None] = {}
        self._finished: set[int] = set()
        self._flush: asyncio.Task[None] | None = None

    def received(self, tag: int) -> None:
        """Call in delivery order, as each message is taken up."""
        self._open[tag] = None

    def rejected(self, tag: int) -> None:
        """The message was rejected (or requeued) on its own; it no longer holds the run up."""
        self._open.pop(tag, None)
        self._finished.discard(tag)

    def finished(self, tag: int) -> None:
        """The message is done and may be acked; it is, within a turn of the loop."""
        if tag not in self._open:
            return
        self._finished.add(tag)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._send_acks())

    async def flushed(self) -> None:
        """Return once every finished message's ack is written to the channel."""
        if self._flush is not None:
            await asyncio.wait({self._flush})

    def _plan(self) -> tuple[int | None, list[int]]:
        """What to ack now: the last tag of the finished run at the head of the open messages
        (to ack with ``multiple``), and the other finished tags (each on its own). Takes them
        out of the window."""
        run: list[int] = []
        for tag in self._open:
            if tag not in self._finished:
                break
            run.append(tag)
        for tag in run:
            del self._open[tag]
            self._finished.discard(tag)
        singles = sorted(self._finished)
        for tag in singles:
            del self._open[tag]
        self._finished.clear()
        return (run[-1] if run else None), singles

    async def _send_acks(self) -> None:
        # Started as a task, this first runs once the handlers that finished in this turn of
        # the loop have all said so; it goes round again for those that finish while it sends.
        try:
            while self._finished:
                top, singles = self._plan()
                if top is not None:
                    await self._send(top, multiple=True)
                for tag in singles:
                    await self._send(tag, multiple=False)
        except Exception as exc:
            # The channel is gone: the broker requeues what it had not been told of.
            log.warning("acks not sent; the broker redelivers those messages", error=str(exc))
        finally:
            self._flush = None
