"""Connecting to RabbitMQ when ``AMQP_URL`` lists several nodes of a cluster, comma-separated.

The nodes are tried in turn, at start and on every reconnect: a connection that loses its
node tries the next ones first, then the rest, until one answers. A single URL behaves
exactly as :func:`aio_pika.connect_robust` and :func:`aio_pika.connect` do.

aio-pika's robust connection reconnects only to the one URL it was given; its
:class:`RotatingRobustConnection` below changes only where each connection attempt goes,
and keeps the rest (recovery of channels, consumers and declarations) as it is.

Options in the query string (``heartbeat``, ``connection_name``…) are taken from the first
URL: give the nodes the same ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection, TimeoutType
from aio_pika.robust_connection import RobustConnection
from yarl import URL

# How long one node may take to accept a connection before the next one is tried.
NODE_CONNECT_SECONDS = 5.0

log = logging.getLogger("sellfern_webhooks.amqp")

# RobustConnection's one connection attempt: it clears the transport, connects to ``self.url``
# (with the timeout given to ``connect``) and restores the channels. A subclass can only reach
# it by its mangled name; checked here so that an aio-pika that renames it fails at import
# instead of quietly reconnecting to one node only.
_CONNECT_ONCE = "_RobustConnection__connect_transport"
_connect_once = cast(
    "Callable[[RobustConnection], Coroutine[Any, Any, None]]",
    getattr(RobustConnection, _CONNECT_ONCE),
)


def node_urls(amqp_url: str) -> list[str]:
    """The URLs of a comma-separated ``AMQP_URL``, stripped, in the order given."""
    return [part.strip() for part in amqp_url.split(",") if part.strip()]


def node_address(url: str) -> str:
    """``host:port`` of an AMQP URL, without its credentials."""
    parsed = URL(url)
    port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
    return f"{parsed.host or 'localhost'}:{port}"


class NoNodeReachableError(ConnectionError):
    """No node of the list could be connected to; ``failures`` says why, node by node."""

    def __init__(self, failures: Sequence[tuple[str, BaseException]]) -> None:
        self.failures = list(failures)
        detail = "; ".join(f"{node_address(url)}: {exc!r}" for url, exc in self.failures)
        super().__init__(detail or "no URL given")


class NodeRotation:
    """The order in which the nodes are tried: each round starts after the node last
    connected to, so that a connection which lost its node tries the others first."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("no AMQP URL given")
        self.urls = tuple(urls)
        self._start = 0

    def round(self) -> Iterator[tuple[int, str]]:
        """Every node once, as ``(index, url)``, starting with the one to try first."""
        count = len(self.urls)
        for step in range(count):
            index = (self._start + step) % count
            yield index, self.urls[index]

    def connected(self, index: int) -> None:
        """The node at ``index`` answered: the next round begins with the one after it."""
        self._start = (index + 1) % len(self.urls)


class RotatingRobustConnection(RobustConnection):
    """A robust connection whose every connection attempt tries the nodes in turn."""

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:  # noqa: ANN401 - RobustConnection's own options
        self.rotation = NodeRotation(urls)
        super().__init__(URL(self.rotation.urls[0]), **kwargs)

    async def connect(self, timeout: TimeoutType = None) -> None:
        # The timeout bounds each node's attempt, so that one that does not answer is left
        # for the next instead of holding the connection.
        await super().connect(NODE_CONNECT_SECONDS if timeout is None else timeout)

    async def _RobustConnection__connect_transport(self) -> None:  # noqa: N802 - the mangled name overrides RobustConnection.__connect_transport
        failures: list[tuple[str, BaseException]] = []
        for index, url in self.rotation.round():
            self.url = URL(url)
            try:
                await _connect_once(self)
            except Exception as exc:
                failures.append((url, exc))
                log.warning("AMQP node %s failed: %r", node_address(url), exc)
                continue
            self.rotation.connected(index)
            if failures:
                log.warning("AMQP connected to node %s", node_address(url))
            return
        # A ConnectionError: RobustConnection fails its first connect with it, and later
        # waits its reconnect interval and tries another round.
        raise NoNodeReachableError(failures)


async def connect_robust(
    amqp_url: str,
    *,
    timeout: float | None = None,
    **kwargs: Any,  # noqa: ANN401 - aio_pika.connect_robust's options
) -> AbstractRobustConnection:
    """A robust connection to the first node of ``amqp_url`` that answers; it moves to
    another node by itself when it loses its own. One URL: :func:`aio_pika.connect_robust`."""
    urls = node_urls(amqp_url)
    if len(urls) <= 1:
        single: AbstractRobustConnection = await aio_pika.connect_robust(
            amqp_url.strip(), timeout=timeout, **kwargs
        )
        return single
    connection = RotatingRobustConnection(urls, **kwargs)
    await connection.connect(timeout)
    return connection


async def connect_first(
    amqp_url: str,
    *,
    node_timeout: float = NODE_CONNECT_SECONDS,
    **kwargs: Any,  # noqa: ANN401 - aio_pika.connect's options
) -> AbstractConnection:
    """A plain (not robust) connection to the first node of ``amqp_url`` that answers, each
    given ``node_timeout``; raises :class:`NoNodeReachableError` when none does."""
    failures: list[tuple[str, BaseException]] = []
    for url in node_urls(amqp_url):
        try:
            async with asyncio.timeout(node_timeout):
                connection: AbstractConnection = await aio_pika.connect(url, **kwargs)
                return connection
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, OSError) as exc:
            failures.append((url, exc))
    raise NoNodeReachableError(failures)
