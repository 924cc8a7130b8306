"""``dead list`` and ``dead redrive`` against the real broker and a running service.

``webhooks.dead`` is filled the way production fills it: an invalid event dead-lettered by
fan-out, a task whose schedule ran out, an event RabbitMQ itself dead-lettered past the
delivery limit, and a message of unknown origin. Every message is counted at every step.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiohttp import web

from schemas.publish import publish_event
from tests.conftest import (
    AMQP_BASE,
    Receiver,
    Service,
    _rabbitmqctl,
    eventually,
    make_settings,
    run_service,
)
from tests.test_cli import run_cli
from worker.pipeline import topology
from worker.settings import Settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A virtual host of this test's own: webhooks.dead is counted whole, so no other test's
    dead letters may be in it."""
    vhost = f"sfw-dead-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"{AMQP_BASE}/{vhost}"
    _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Dead letters live in the broker only; one database is enough."""
    return f"sqlite+aiosqlite:///{tmp_path / 'webhooks.db'}"


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(amqp_url)
    yield connection
    await connection.close()


async def _depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def _dead(amqp_url: str, *args: str) -> tuple[int, list[str], str]:
    """Run ``sellfern-webhooks dead ARGS`` as an operator would: exit status, stdout lines,
    stderr. In a thread, so the service in this process keeps running meanwhile."""
    env = {"SELLFERN_WEBHOOKS_AMQP_URL": amqp_url}
    done = await asyncio.to_thread(run_cli, "dead", *args, env=env)
    return done.returncode, done.stdout.splitlines(), done.stderr


def _columns(lines: list[str]) -> list[list[str]]:
    """The lines of a listing, split into reason, detail, event id, endpoint, origin."""
    return [line.split("\t") for line in lines[:-1]]


@dataclass(frozen=True)
class _Mix:
    webhook_id: str
    exhausted: str  # the event whose task ran out of attempts
    poisoned: str  # the event RabbitMQ dead-lettered past the delivery limit


async def _fill_the_dead(
    settings: Settings, org: str, receiver: Receiver, broker: AbstractConnection
) -> _Mix:
    """Put one of each kind in webhooks.dead, in this order: an exhausted task, an invalid
    event, a message of unknown origin, an event dead-lettered by RabbitMQ."""

    async def down(_request: web.Request, _seen: int) -> web.Response:
        return web.Response(status=500)

    receiver.behaviours["/hook"] = down
    channel = await broker.channel(publisher_confirms=True)

    async def dead_holds(n: int) -> bool:
        return await _depth(channel, topology.DEAD_QUEUE) == n

    async with aiohttp.ClientSession() as http, run_service(settings) as running:
        _, token = await running.store.tokens.create(org, ("webhooks:manage",), "test")
        service = Service(running, http, token, org)
        status, webhook = await service.call(
            "POST", "/webhooks", {"url": receiver.url("/hook"), "events": ["order.created"]}
        )
        assert status == 201, webhook
        exhausted = await publish_event(broker, "order.created", org, {"n": 1})
        await eventually(lambda: dead_holds(1), what="the exhausted task dead-lettered")
        assert len(receiver.at("/hook")) == 3  # the first attempt and two retries
        events = await channel.get_exchange(topology.EVENTS_EXCHANGE)
        await events.publish(aio_pika.Message(b"not json at all"), routing_key="order.created")
        await eventually(lambda: dead_holds(2), what="the invalid event dead-lettered")
        await channel.default_exchange.publish(
            aio_pika.Message(b"\x00 from nowhere", headers={"x-note": "by hand"}),
            routing_key=topology.DEAD_QUEUE,
        )

    # With no service: an event that fails the worker every time is dead-lettered by RabbitMQ
    # past the delivery limit (here: rejected with requeue until it goes).
    poisoned = await publish_event(broker, "order.created", org, {"n": 2})
    events_queue = await channel.get_queue(topology.EVENTS_QUEUE)

    async def rejected_to_the_dead() -> bool:
        message = await events_queue.get(no_ack=False, fail=False)
        if message is not None:
            await message.reject(requeue=True)
        return await dead_holds(4)

    await eventually(rejected_to_the_dead, what="RabbitMQ dead-lettering the event")
    await channel.close()
    return _Mix(webhook["id"], exhausted.id, poisoned.id)


async def _listings_take_nothing(amqp_url: str, channel: AbstractChannel, mix: _Mix) -> None:
    """``dead list`` in full, in part, filtered, and ``redrive --dry-run``: each leaves every
    message in place and in order."""
    code, listed, _ = await _dead(amqp_url, "list")
    assert code == 0
    assert listed[-1] == "4 shown of 4 in webhooks.dead"
    rows = _columns(listed)
    assert [[row[0], *row[2:]] for row in rows] == [
        ["exhausted", mix.exhausted, mix.webhook_id, "task"],
        ["invalid_json", "-", "-", "event"],
        ["-", "-", "-", "unknown"],
        ["delivery_limit", mix.poisoned, "-", "event"],
    ]
    assert rows[0][1] == "HTTP 500"
    assert "webhooks.events" in rows[3][1]
    assert await _depth(channel, topology.DEAD_QUEUE) == 4

    _, first_two, _ = await _dead(amqp_url, "list", "--limit", "2")
    assert first_two == [*listed[:2], "2 shown of 4 in webhooks.dead"]
    _, again, _ = await _dead(amqp_url, "list")
    assert again == listed  # a partial listing put what it read back where it was
    _, only, _ = await _dead(amqp_url, "list", "--reason", "exhausted")
    assert only == [listed[0], "1 shown with reason exhausted of 4 in webhooks.dead"]

    code, planned, _ = await _dead(amqp_url, "redrive", "--dry-run")
    assert code == 0
    assert [line.split("\t")[0] for line in planned[:-1]] == [
        "would redrive", "would redrive", "left", "would redrive"
    ]  # fmt: skip
    assert planned[0].endswith("-> webhooks.deliveries")
    assert planned[1].endswith("-> webhooks.events")
    assert planned[2].endswith("(origin unknown)")
    assert planned[-1] == (
        "would redrive 3, left 1, skipped 0 (other reasons) of 4 in webhooks.dead; "
        "dry run, nothing changed"
    )
    assert await _depth(channel, topology.DEAD_QUEUE) == 4
    assert (await _dead(amqp_url, "list"))[1] == listed


async def test_list_and_dry_run_take_nothing_and_redrive_moves_the_known_back(
    amqp_url: str,
    database_url: str,
    ca_bundle: str,
    org: str,
    receiver: Receiver,
    broker: AbstractConnection,
) -> None:
    settings = make_settings(database_url, amqp_url, ca_bundle, retry_schedule="0.2,0.2")
    mix = await _fill_the_dead(settings, org, receiver, broker)
    channel = await broker.channel()
    await _listings_take_nothing(amqp_url, channel, mix)

    # The endpoint is healthy again and the service back: redrive.
    del receiver.behaviours["/hook"]
    async with run_service(settings) as running:
        code, moved, _ = await _dead(amqp_url, "redrive", "--reason", "delivery_limit")
        assert code == 0
        assert moved[-1] == "redriven 1, left 0, skipped 3 (other reasons) of 4 in webhooks.dead"
        await receiver.wait_for(
            lambda got: any(r.headers["webhook-id"] == mix.poisoned for r in got)
        )

        code, moved, _ = await _dead(amqp_url, "redrive")
        assert code == 0
        assert moved[-1] == "redriven 2, left 1, skipped 0 (other reasons) of 3 in webhooks.dead"
        # The task gets one more attempt, which now succeeds.
        await receiver.wait_for(
            lambda got: sum(r.headers["webhook-id"] == mix.exhausted for r in got) == 4
        )

        async def succeeded() -> bool:
            state = await running.store.events.delivery_state(mix.exhausted, mix.webhook_id)
            return state == "succeeded"

        await eventually(succeeded, what="the redriven delivery recorded as succeeded")

        # The invalid event went back to fan-out, which dead-letters it again: nothing lost.
        async def both_left_in_the_dead() -> bool:
            return await _depth(channel, topology.DEAD_QUEUE) == 2

        await eventually(both_left_in_the_dead, what="the invalid event back in the dead")

    _, listed, _ = await _dead(amqp_url, "list")
    assert [[row[0], row[4]] for row in _columns(listed)] == [
        ["-", "unknown"], ["invalid_json", "event"]
    ]  # fmt: skip
    assert await _depth(channel, topology.EVENTS_QUEUE) == 0
    assert await _depth(channel, topology.DELIVERIES_QUEUE) == 0
    assert [r.headers["webhook-id"] for r in receiver.at("/hook")].count(mix.poisoned) == 1


async def test_unreachable_broker_or_missing_queue_is_one_line_and_exit_2(amqp_url: str) -> None:
    code, out, err = await _dead("amqp://guest:guest@127.0.0.1:1/", "list")
    assert code == 2
    assert out == []
    assert err.count("\n") == 1
    assert "SELLFERN_WEBHOOKS_AMQP_URL" in err
    assert "127.0.0.1:1" in err
    assert "guest:guest" not in err

    # A virtual host where no service has declared the topology yet.
    code, out, err = await _dead(amqp_url, "redrive", "--dry-run")
    assert code == 2
    assert err.count("\n") == 1
    assert "no queue webhooks.dead" in err


async def test_a_redrive_that_is_not_confirmed_leaves_the_message(
    amqp_url: str, broker: AbstractConnection
) -> None:
    """With no queue to take them back, the broker returns the copies: the originals stay."""
    channel = await broker.channel(publisher_confirms=True)
    await channel.declare_queue(
        topology.DEAD_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    for n in (1, 2):
        body = json.dumps({"event_id": f"evt_{n}", "webhook_id": "wh_x", "attempt": 1})
        await channel.default_exchange.publish(
            aio_pika.Message(body.encode(), headers={"x-reason": "exhausted"}),
            routing_key=topology.DEAD_QUEUE,
        )
    code, out, _ = await _dead(amqp_url, "redrive", "--limit", "1")
    assert code == 1
    assert len(out) == 2
    assert out[0].startswith("left\texhausted\t")
    assert "\tevt_1\twh_x\ttask\t" in out[0]
    assert "to webhooks.deliveries: refused by the broker" in out[0]
    assert out[-1] == "redriven 0, left 1, skipped 0 (other reasons) of 2 in webhooks.dead"
    assert await _depth(channel, topology.DEAD_QUEUE) == 2
    _, listed, _ = await _dead(amqp_url, "list")
    assert [row[2] for row in _columns(listed)] == ["evt_1", "evt_2"]
