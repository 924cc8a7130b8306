"""Reaching the database and the broker at start-up, with one clear line when either is not there.

A process that cannot reach what it needs exits with status 2 and a single line naming the
setting and the address it tried, instead of a driver's traceback: the operator's next step is
to check that setting or that host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.engine import make_url

from schemas.amqp import connect_robust, node_address, node_urls
from worker.ops.logging import quiet

T = TypeVar("T")
ENV_PREFIX = "SELLFERN_WEBHOOKS_"
# How long start-up waits for the broker's first connection before giving up.
BROKER_CONNECT_SECONDS = 15.0


class UnreachableError(Exception):
    """A dependency could not be reached; ``str()`` is the one line to print."""

    def __init__(self, what: str, setting: str, address: str, error: BaseException) -> None:
        detail = str(error) or type(error).__name__
        super().__init__(
            f"cannot reach the {what} at {address} ({ENV_PREFIX}{setting}): {detail[:200]}"
        )


def database_address(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    return f"{parsed.host or 'localhost'}:{parsed.port or 5432}"


def broker_address(url: str) -> str:
    """``host:port`` of each node of ``AMQP_URL`` (comma-separated when a cluster)."""
    return ", ".join(node_address(u) for u in node_urls(url)) or "no URL"


async def reach_database(url: str, step: Awaitable[T]) -> T:
    """Run the first database step (``ensure_schema``); an unreachable server or an unusable
    file becomes an :class:`UnreachableError`."""
    try:
        return await step
    except (OSError, TimeoutError) as exc:
        raise UnreachableError("database", "DATABASE_URL", database_address(url), exc) from exc
    except Exception as exc:
        # SQLAlchemy wraps driver errors; only a failure to connect is reported this way.
        if type(exc).__name__ in {"OperationalError", "InterfaceError"}:
            address = database_address(url)
            raise UnreachableError("database", "DATABASE_URL", address, exc) from exc
        raise


async def reach_broker(url: str, **kwargs: Any) -> AbstractRobustConnection:  # noqa: ANN401
    """The robust connection the process keeps; its first connect must succeed in time
    (later losses are ridden out by reconnecting — to another node, when ``url`` lists a
    cluster's nodes: see :mod:`schemas.amqp`)."""
    try:
        with quiet("aiormq.connection", "aio_pika.robust_connection", "sellfern_webhooks.amqp"):
            return await asyncio.wait_for(connect_robust(url, **kwargs), BROKER_CONNECT_SECONDS)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise UnreachableError("broker", "AMQP_URL", broker_address(url), exc) from exc
