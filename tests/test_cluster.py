"""Fault injection across RabbitMQ nodes: the node that leads the queues stops under load.

A three-node cluster is formed on this machine for the test (:mod:`tests.cluster_support`;
the machine's own node is left alone). The worker, a child process, and the publisher are
given the three nodes' URLs in ``AMQP_URL``; the service declares its queues as quorum
queues, replicated on the three nodes. Under load, the node that leads ``webhooks.events``
is stopped, the load goes on, the node comes back. Asserted: no confirmed event is lost, the
worker moved to another node by itself (not restarted) and kept delivering, and a publish
during the failover was either confirmed or failed with ``PublishError`` within its timeout.
Prints the chaos tally line (see ``tests/test_chaos.py``).

Run it alone: ``.venv/bin/python -m pytest tests/test_cluster.py`` (about a minute and a half,
forming the cluster included).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from schemas.amqp import connect_robust
from schemas.publish import PublishError, publish_event
from tests.chaos_support import (
    Ledger,
    Tally,
    WorkerProcess,
    publish_load,
    queues_idle,
    seed,
    worker_env,
)
from tests.cluster_support import Cluster, Node, node_root
from tests.conftest import TEST_SECRET_KEY, Figures, Receiver, connection_name, eventually
from worker.pipeline import topology
from worker.store import Store

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

ORDER_TYPES = ("order.created", "order.updated", "order.created")
TEST_SCHEDULE = (0.3, 0.3)
PROBE_TIMEOUT = 3.0


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    root = node_root("rabbitmq-cluster")
    formed = Cluster(root)
    try:
        await formed.start()
        yield formed
    finally:
        await formed.close()


@pytest.fixture
async def publisher(cluster: Cluster) -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect_robust(
        cluster.amqp_url,
        client_properties={"connection_name": connection_name()},
        reconnect_interval=1,
    )
    yield connection
    await connection.close()


async def _connections_named(node: Node, name: str) -> int:
    text = await node.ctl("list_connections", "client_properties")
    return text.count(name)


async def _probe(connection: AbstractRobustConnection, ledger: Ledger, org: str) -> str:
    """One publish while the leader is away: confirmed (and then tallied like the load's) or
    a PublishError, within its timeout either way."""
    started = time.monotonic()
    ledger.published += 1
    try:
        envelope = await publish_event(
            connection, "order.created", org, {"probe": True}, timeout=PROBE_TIMEOUT
        )
    except PublishError:
        outcome = "PublishError"
    else:
        ledger.sent_at[envelope.id] = started
        ledger.confirmed[envelope.id] = (org, "order.created")
        outcome = "confirmed"
    assert time.monotonic() - started < PROBE_TIMEOUT + 1, "a publish hung in the failover"
    return outcome


async def test_cluster_node_failover_under_load(
    postgres_url: str,
    ca_bundle: str,
    receiver: Receiver,
    cluster: Cluster,
    publisher: AbstractRobustConnection,
    pg_store: Store,
    org: str,
    tmp_path: Path,
    figures: Figures,
) -> None:
    ledger = Ledger("cluster_node_failover", seed())
    await ledger.add_endpoint(pg_store, receiver, org, "/all", ["order.created", "order.updated"])
    await ledger.add_endpoint(pg_store, receiver, org, "/created", ["order.created"])
    env = worker_env(postgres_url, cluster.amqp_url, ca_bundle, secret_keys=TEST_SECRET_KEY)
    worker = WorkerProcess(env, tmp_path)
    try:
        await worker.start()
        await eventually(worker.started, timeout=30, what="worker started")

        # The service declared quorum queues, and the cluster replicated them on every node.
        for queue in (topology.EVENTS_QUEUE, topology.DELIVERIES_QUEUE):
            assert sorted(await cluster.members(queue)) == sorted(n.name for n in cluster.nodes)
        leaders = await cluster.leaders()
        leader = cluster.node(leaders[topology.EVENTS_QUEUE])
        others = [n for n in cluster.nodes if n is not leader]

        load = asyncio.create_task(
            publish_load(publisher, ledger, org, ORDER_TYPES, 500, 25, timeout=PROBE_TIMEOUT)
        )
        await receiver.wait_for(lambda r: len(r) >= 100, timeout=30)
        await leader.stop_app()
        # Events whose publish starts from now on can only be delivered through another node.
        down = time.monotonic()
        probes = await asyncio.gather(*(_probe(publisher, ledger, org) for _ in range(3)))
        assert not load.done(), "the load ended before the node came back"

        # The worker moved to another node by itself, and delivers events published since.
        async def delivering_after_stop() -> bool:
            return any(ledger.sent_at[event_id] > down for event_id, _path in ledger.accepted_at)

        await eventually(delivering_after_stop, timeout=45, what="deliveries after the stop")
        assert worker.running
        assert worker.starts == 1
        moved = [await _connections_named(n, "sellfern-webhooks worker") for n in others]
        assert sum(moved) >= 1, "the worker has no connection on a surviving node"
        new_leaders = await cluster.leaders(via=others[0])
        assert new_leaders[topology.EVENTS_QUEUE] != leader.name
        outage = time.monotonic() - down

        await leader.start_app()
        await load

        survivor = others[0].url()
        await eventually(
            lambda: ledger.settled(pg_store), timeout=90, what="every pair delivered or failed"
        )
        await eventually(
            lambda: queues_idle(survivor, TEST_SCHEDULE), timeout=30, what="queues drained"
        )
        code, _ = await worker.terminate()
        assert code == 0, worker.tail()
    finally:
        await worker.close()
    tally = await ledger.tally(pg_store)
    figures(tally.line())
    figures(
        f"leaders before: {leaders[topology.EVENTS_QUEUE]} (events), "
        f"{leaders[topology.DELIVERIES_QUEUE]} (deliveries); "
        f"stopped {leader.name} for {outage:.1f}s; "
        f"leader after: {new_leaders[topology.EVENTS_QUEUE]}; worker connections on the "
        f"other nodes: {moved}; probes during the failover: {probes}; "
        f"load publish errors: {len(ledger.publish_errors)}"
    )
    await _check_outcome(ledger, tally, probes, survivor)


async def _check_outcome(ledger: Ledger, tally: Tally, probes: list[str], survivor: str) -> None:
    assert ledger.bad_signatures == 0
    assert tally.lost == 0, f"lost: {tally.lost_examples}"
    assert tally.unstored == 0, "a pair was delivered but not recorded as succeeded"
    assert tally.confirmed >= tally.published - len(ledger.publish_errors) - probes.count(
        "PublishError"
    )
    assert set(probes) <= {"confirmed", "PublishError"}
    # The queues kept their contents through the failover.
    async with await aio_pika.connect(survivor) as connection:
        channel = await connection.channel()
        events = await channel.declare_queue(topology.EVENTS_QUEUE, passive=True)
        assert events.declaration_result.message_count == 0
