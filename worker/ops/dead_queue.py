"""``dead list`` and ``dead redrive``: walking ``webhooks.dead`` without losing a message.

**Reading without taking.** Messages are taken with ``basic.get`` and never acked, rejected or
nacked: they stay checked out to our channel, and closing the channel at the end hands them all
back at once. An explicit ``basic.reject``/``basic.nack`` with requeue would not do: on
RabbitMQ 3.x a quorum queue without a delivery limit requeues those at its *tail*. Messages
handed back by a closed channel go to the queue's line of returned messages, which is served
before the messages never delivered, in the order they were returned — but behind any returned
earlier (by a previous listing, say). So after the messages it needs, a scan goes on taking,
and holding, messages as long as they are redeliveries, up to the first one never delivered:
handed back together, they leave the queue in the order it had. A listing therefore takes the
N messages it shows (with ``--reason``: until N match), plus at most those an earlier listing
returned and one more; never more than the queue held when it began (messages dead-lettered
meanwhile land behind those and are not looked at).

Every return still counts as a redelivery (``x-delivery-count`` goes up by one per listing).
``webhooks.dead`` declares no delivery limit, so that is harmless on RabbitMQ 3.x; on RabbitMQ
4.0 to 4.2, whose quorum queues default to a limit of 20 returns, give the queue a policy with
``delivery-limit: -1`` or a message listed twenty times is dropped.

**Redriving.** A message goes back where it came from: an event to ``webhooks.events`` (straight
there through the default exchange, not through ``sellfern.events``, whose other subscribers
would get a second copy), a task to ``webhooks.deliveries`` with its ``x-webhook-id`` header and
without the dead-letter headers. A task keeps its attempt number: it gets one more attempt, and
if that fails it is dead-lettered again as ``exhausted``. An invalid event that is still invalid
also comes back, with its reason: redrive those with ``--reason`` once their cause is fixed
(a new event type deployed, ``MAX_EVENT_BYTES`` raised). The republish is confirmed by the
broker before the original is acked out of ``webhooks.dead``; a crash in between leaves a
duplicate, never a loss (deliveries are idempotent per event and endpoint). A message whose
origin cannot be told, or whose republish is not confirmed, stays where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TextIO

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue
from pamqp.commands import Basic
from yarl import URL

from schemas.amqp import NoNodeReachableError, connect_first, node_urls
from worker.ops.dead_letters import DeadLetter, describe, matches, redrive_headers
from worker.ops.logging import quiet
from worker.pipeline import topology

CONNECT_TIMEOUT = 10.0
CONFIRM_TIMEOUT = 30.0
RETURN_WAIT = 10.0


class BrokerUnreachableError(Exception):
    """No URL of ``AMQP_URL`` could be connected to; the message names the hosts."""


def where(url: str) -> str:
    """``host:port`` and virtual host of an AMQP URL, without its credentials."""
    parsed = URL(url.strip())
    port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
    vhost = parsed.path.removeprefix("/") or "/"
    return f"{parsed.host}:{port} (vhost {vhost})"


def _why(exc: BaseException) -> str:
    """What went wrong at connection time, in a few words."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return f"login refused: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, aiormq.exceptions.ProtocolSyntaxError) and "Connection.Close" in str(exc):
        # RabbitMQ's answer to opening a virtual host that does not exist or is not permitted.
        return "refused at connection open: no such virtual host, or no permission on it"
    if len(exc.args) == 2 and isinstance(exc.args[1], str):  # (errno, message)
        return exc.args[1]
    return str(exc) or repr(exc)


async def connect(amqp_url: str, name: str) -> AbstractConnection:
    """Connect to the first reachable of the comma-separated URLs, as the service does."""
    try:
        with quiet("aiormq.connection"):
            return await connect_first(
                amqp_url,
                node_timeout=CONNECT_TIMEOUT,
                client_properties={"connection_name": f"sellfern-webhooks {name}"},
            )
    except NoNodeReachableError as exc:
        errors = [
            f"{where(url)}: no answer within {CONNECT_TIMEOUT:g}s"
            if isinstance(error, TimeoutError)
            else f"{where(url)}: {_why(error)}"
            for url, error in exc.failures
        ]
        raise BrokerUnreachableError("; ".join(errors) or "no URL given") from None


@dataclass
class _Scan:
    channel: aio_pika.abc.AbstractChannel
    queue: AbstractQueue
    total: int
    skipped: int = 0
    taken: int = 0
    removed: int = 0

    async def remove(self, message: AbstractIncomingMessage) -> None:
        """Ack a message out of the queue (once its copy is confirmed elsewhere)."""
        await message.ack()
        self.removed += 1

    async def _take(self) -> AbstractIncomingMessage | None:
        if self.taken >= self.total:
            return None
        message = await self.queue.get(no_ack=False, fail=False, timeout=CONFIRM_TIMEOUT)
        self.taken += message is not None
        return message

    async def matching(
        self, reason: str | None, limit: int | None
    ) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetter]]:
        """Take messages from the head, unacked, and yield those with ``reason``: at most
        ``limit``, and only from the ``total`` that were there when the scan began."""
        found = 0
        redelivered = False
        while limit is None or found < limit:
            message = await self._take()
            if message is None:
                return
            redelivered = bool(message.redelivered)
            letter = describe(message.body, message.headers, message.message_id)
            if not matches(letter, reason):
                self.skipped += 1
                continue
            found += 1
            yield message, letter
        # Returned messages wait in a line of their own, served before those never delivered,
        # and a return joins the end of that line. So that ours go back where they were, take
        # (and hold) the rest of that line too: up to the first message never delivered.
        while redelivered and (message := await self._take()) is not None:
            redelivered = bool(message.redelivered)


async def _returned(connection: AbstractConnection, expected: int) -> None:
    """Wait until the queue holds ``expected`` messages again, for a while at most.

    The broker hands a closed channel's messages back a moment after it has confirmed the
    close; a command that returned before then would leave the next one a short queue.
    """
    with contextlib.suppress(TimeoutError, aiormq.exceptions.AMQPError):
        async with asyncio.timeout(RETURN_WAIT), await connection.channel() as channel:
            while True:
                queue = await channel.declare_queue(topology.DEAD_QUEUE, passive=True)
                if (queue.declaration_result.message_count or 0) >= expected:
                    return
                await asyncio.sleep(0.02)


@asynccontextmanager
async def _scan(connection: AbstractConnection) -> AsyncIterator[_Scan]:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(topology.DEAD_QUEUE, passive=True)
    scan = _Scan(channel, queue, queue.declaration_result.message_count or 0)
    try:
        yield scan
    finally:
        # Besides _Scan.remove, the one place the messages taken are settled: closing the
        # channel hands back all those not removed, in order (see the module's docstring).
        if not channel.is_closed:
            await channel.close()
    await _returned(connection, scan.total - scan.removed)


async def list_dead(
    connection: AbstractConnection, out: TextIO, *, reason: str | None, limit: int | None
) -> int:
    """Print what waits in ``webhooks.dead``, one line each, then a summary; take nothing."""
    async with _scan(connection) as scan:
        shown = 0
        async for _message, letter in scan.matching(reason, limit):
            out.write(letter.line() + "\n")
            shown += 1
    which = f" with reason {reason}" if reason else ""
    out.write(f"{shown} shown{which} of {scan.total} in {topology.DEAD_QUEUE}\n")
    return 0


async def _republish(
    channel: aio_pika.abc.AbstractChannel,
    message: AbstractIncomingMessage,
    letter: DeadLetter,
    target: str,
) -> str | None:
    """Publish a copy to ``target`` and wait for the broker's confirm; return why not, if it
    was not confirmed."""
    copy = aio_pika.Message(
        message.body,
        headers=redrive_headers(letter, message.headers),
        content_type=message.content_type or "application/json",
        content_encoding=message.content_encoding,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        app_id=message.app_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    try:
        confirmation = await channel.default_exchange.publish(
            copy, routing_key=target, mandatory=True, timeout=CONFIRM_TIMEOUT
        )
    except TimeoutError:
        return f"no confirm within {CONFIRM_TIMEOUT:g}s"
    except aio_pika.exceptions.DeliveryError as exc:
        return f"refused by the broker: {exc}"
    if not isinstance(confirmation, Basic.Ack):
        return f"not confirmed: {confirmation!r}"
    return None


async def redrive(
    connection: AbstractConnection,
    out: TextIO,
    *,
    reason: str | None,
    limit: int | None,
    dry_run: bool,
) -> int:
    """Move messages of ``webhooks.dead`` back to their origin, each confirmed before it is
    acked out; print one line per message handled and a summary. 1 if a republish failed."""
    redriven = left = failed = 0
    verb = "would redrive" if dry_run else "redriven"
    async with _scan(connection) as scan:
        async for message, letter in scan.matching(reason, limit):
            target = letter.target
            if target is None:
                left += 1
                out.write(f"left\t{letter.line()}\t(origin unknown)\n")
                continue
            if not dry_run:
                problem = await _republish(scan.channel, message, letter, target)
                if problem is not None:
                    failed += 1
                    out.write(f"left\t{letter.line()}\t(to {target}: {problem})\n")
                    continue
                await scan.remove(message)
            redriven += 1
            out.write(f"{verb}\t{letter.line()}\t-> {target}\n")
    summary = (
        f"{verb} {redriven}, left {left + failed}, skipped {scan.skipped} "
        f"(other reasons) of {scan.total} in {topology.DEAD_QUEUE}"
    )
    out.write(summary + ("; dry run, nothing changed\n" if dry_run else "\n"))
    return 1 if failed else 0


async def run(
    command: str,
    amqp_url: str,
    out: TextIO,
    err: TextIO,
    *,
    reason: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
) -> int:
    """Run ``dead list`` or ``dead redrive``; the exit status (2: broker or queue missing)."""
    try:
        connection = await connect(amqp_url, f"dead {command}")
    except BrokerUnreachableError as exc:
        err.write(
            f"sellfern-webhooks: cannot reach the broker (SELLFERN_WEBHOOKS_AMQP_URL): {exc}\n"
        )
        return 2
    try:
        if command == "list":
            return await list_dead(connection, out, reason=reason, limit=limit)
        return await redrive(connection, out, reason=reason, limit=limit, dry_run=dry_run)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        err.write(
            f"sellfern-webhooks: no queue {topology.DEAD_QUEUE} at {_hosts(amqp_url)} "
            "(SELLFERN_WEBHOOKS_AMQP_URL): no service has declared its topology there\n"
        )
        return 2
    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
        # Whatever was taken and not yet acked is back in the queue: the broker returns it
        # when the channel goes.
        err.write(
            f"sellfern-webhooks: lost RabbitMQ at {_hosts(amqp_url)}: {exc!r}; messages not "
            f"reported as redriven are still in {topology.DEAD_QUEUE}\n"
        )
        return 1
    finally:
        await connection.close()


def _hosts(amqp_url: str) -> str:
    return ", ".join(where(u) for u in node_urls(amqp_url))
