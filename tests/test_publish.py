"""The publish helper never hangs and says why an event was not accepted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from schemas.publish import PublishError, connect, publish_event
from tests.conftest import AMQP_BASE, _rabbitmqctl


@pytest.fixture
def empty_vhost() -> Iterator[str]:
    """A virtual host with no queue bound to the events exchange."""
    vhost = f"sfw-empty-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"{AMQP_BASE}/{vhost}"
    _rabbitmqctl("delete_vhost", vhost)


async def test_unroutable_event_raises(empty_vhost: str) -> None:
    connection = await connect(empty_vhost)
    try:
        with pytest.raises(PublishError, match="unroutable"):
            await publish_event(connection, "order.created", "org_x", {}, timeout=5)
    finally:
        await connection.close()


async def test_unreachable_broker_fails_within_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(PublishError, match="not reachable"):
        await connect("amqp://guest:guest@127.0.0.1:1/", timeout=2)
    assert time.monotonic() - started < 5
