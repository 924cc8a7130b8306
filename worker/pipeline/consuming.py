"""Consuming the pipeline's queues with the broker's message as it arrives.

aio-pika hands each consumed message to its callback as an ``IncomingMessage``: about thirty
attribute writes to copy the frame's properties, and a second task beside the one aiormq
already runs the consumer in. The two pipeline consumers read four of those fields and settle
messages themselves (:mod:`worker.pipeline.settle`), so they take aiormq's
``DeliveredMessage`` directly, in aiormq's task.

Everything else stays aio-pika's: :class:`DirectQueue` is its robust queue, registered with
its robust channel, which declares it again and re-consumes it after a reconnect or a reopened
channel, and asks for recovery when the broker cancels its consumer (a quorum queue's leader
moved). Only the callback aiormq calls differs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from aio_pika.abc import AbstractRobustChannel, TimeoutType
from aio_pika.robust_queue import RobustQueue
from aiormq.abc import DeliveredMessage
from pamqp.common import Arguments

Delivered = DeliveredMessage
DeliveredCallback = Callable[[DeliveredMessage], Coroutine[Any, Any, None]]


class DirectQueue(RobustQueue):
    """A robust queue whose consumers get aiormq's ``DeliveredMessage``."""

    __slots__ = ()

    async def consume(  # type: ignore[override]  # the callback takes the broker's message
        self,
        callback: DeliveredCallback,
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: Arguments = None,
        consumer_tag: str | None = None,
        timeout: TimeoutType = None,
        robust: bool = True,
    ) -> str:
        channel = await self.channel.get_underlay_channel()
        result = await channel.basic_consume(
            queue=self.name,
            consumer_callback=callback,
            exclusive=exclusive,
            no_ack=no_ack,
            arguments=arguments,
            consumer_tag=consumer_tag,
            timeout=timeout,
        )
        if result.consumer_tag is None:
            raise RuntimeError("the broker gave the consumer no tag")
        if robust:
            # What RobustQueue keeps to consume again on restore(), in its own form.
            self._consumers[result.consumer_tag] = {
                "callback": callback,
                "no_ack": no_ack,
                "exclusive": exclusive,
                "arguments": arguments,
            }
        return result.consumer_tag


async def consume_directly(
    channel: AbstractRobustChannel, queue_name: str, callback: DeliveredCallback
) -> tuple[DirectQueue, str]:
    """Consume the existing queue ``queue_name`` on ``channel`` (which is used for nothing
    else), restored with the channel; return the queue and the consumer tag."""
    # declare_queue (passive), not get_queue: only a declared queue is registered with its
    # robust channel, which re-consumes it after a reconnect; a get_queue one stays silent.
    channel.QUEUE_CLASS = DirectQueue  # this channel's queues only
    queue = await channel.declare_queue(queue_name, passive=True)
    if not isinstance(queue, DirectQueue):
        raise TypeError(f"{queue_name}: the channel made a {type(queue).__name__}")
    return queue, await queue.consume(callback)


def headers_of(message: DeliveredMessage) -> dict[str, Any] | None:
    """The message's AMQP headers, as the broker sent them."""
    return message.header.properties.headers
