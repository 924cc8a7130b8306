"""Reliability across replicas and nodes: several processes on one database, and a database
that restarts under them.

1. Two API processes and three worker processes share one PostgreSQL database and one
   virtual host. Under load — one endpoint fast, one slow enough that its backlog is parked —
   one worker is killed with SIGKILL and not restarted: the other two take over its work,
   parked deliveries included. Then an endpoint created through the first API is paused
   through the second, and no request reaches it after the PATCH has returned, beyond the
   ones already under way.
2. A PostgreSQL cluster of the test's own (Debian's ``pg_createcluster``, so the machine's
   shared server is left alone) is restarted in fast mode under load: the same worker
   process keeps delivering, nothing confirmed is lost, and it exits 0 on SIGTERM.

Each prints the tally line of :mod:`tests.test_chaos`. Run only this file:
``.venv/bin/python -m pytest -q tests/test_replicas.py -p no:cacheprovider -s``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from tests.chaos_support import (
    IN_THE_SOCKETS_SECONDS,
    Endpoint,
    Ledger,
    Tally,
    WorkerProcess,
    publish_load,
    queues_idle,
    scaled,
    seed,
    worker_env,
)
from tests.conftest import TEST_SECRET_KEY, Figures, Receiver, eventually
from worker.pipeline.parking import ADOPT_SECONDS
from worker.store import Store, database, tables
from worker.store.crypto import SecretBox

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

ORDER_TYPES = ("order.created", "order.updated", "order.created")
TEST_SCHEDULE = (0.3, 0.3)
# The slow endpoint's answer: past the scheduler's FAST_SECONDS (0.25 s), so that with a cap
# of two attempts per worker its new deliveries are parked.
SLOW_SECONDS = 0.4
ENDPOINT_CAP = "2"
# A request the worker had already put on the wire when the PATCH returned may still be read
# by the receiver a moment later (this process's event loop also runs the load).
ON_THE_WIRE_SECONDS = 0.05
SKIPPED = "delivery skipped: endpoint deleted or disabled"


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    return Ledger(request.node.name.removeprefix("test_"), seed())


# --- processes --------------------------------------------------------------------------------


@dataclass
class ApiProcess:
    """``python -m worker.cli api`` on a port of its own; its stderr goes to ``log_path``."""

    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    port: int | None = None

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker.cli", "api", env=self.env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    async def started(self) -> bool:
        """The API logged that it listens, and on which port (for ``eventually``)."""
        assert self.process is not None
        if self.process.returncode is not None:
            raise AssertionError(f"api exited with {self.process.returncode}")
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"started"' in line:
                self.port = int(json.loads(line)["api_port"])
                return True
        return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/api/v2{path}"

    async def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def _api_call(
    http: aiohttp.ClientSession,
    api: ApiProcess,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any],
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.request(method, api.url(path), json=body, headers=headers) as response:
        return response.status, await response.json()


async def _create_endpoint(
    http: aiohttp.ClientSession,
    api: ApiProcess,
    token: str,
    receiver: Receiver,
    org: str,
    path: str,
    events: Sequence[str],
) -> Endpoint:
    status, body = await _api_call(
        http, api, token, "POST", "/webhooks", {"url": receiver.url(path), "events": list(events)}
    )
    assert status == 201, body
    return Endpoint(org, path, body["id"], body["secret"], frozenset(events))


@dataclass
class Arrivals:
    """When each request reached a receiver path (before it is answered), by this process's
    monotonic clock."""

    answer_after: float
    at: list[float] = field(default_factory=list)

    async def serve(self, _request: web.Request, _n: int) -> web.StreamResponse:
        self.at.append(time.monotonic())
        await asyncio.sleep(self.answer_after)  # the endpoint's response time
        return web.Response(text="ok")


async def _parked_ids(store: Store, webhook_id: str) -> set[str]:
    query = sa.select(tables.deliveries.c.event_id).where(
        tables.deliveries.c.webhook_id == webhook_id, tables.deliveries.c.state == "parked"
    )
    async with store.engine.connect() as connection:
        return set((await connection.execute(query)).scalars())


async def _settle(
    ledger: Ledger, store: Store, amqp_url: str, timeout: float, figures: Figures
) -> Tally:
    """Wait until every pair is delivered or recorded failed and the queues are empty, then
    tally and print the line."""
    try:
        await eventually(
            lambda: ledger.settled(store),
            timeout=timeout,
            what="every pair delivered or recorded failed",
        )
        await eventually(
            lambda: queues_idle(amqp_url, TEST_SCHEDULE), timeout=60, what="queues drained"
        )
    finally:
        tally = await ledger.tally(store)
        figures(tally.line())
    assert ledger.bad_signatures == 0
    assert tally.lost == 0, f"lost: {tally.lost_examples}"
    assert tally.unstored == 0, "a pair was delivered but not recorded as succeeded"
    return tally


# --- 1. replicas ------------------------------------------------------------------------------


async def test_replicas_kill_9_takeover_and_pause(  # noqa: PLR0915 - one scenario, told in order
    postgres_url: str,
    amqp_url: str,
    ca_bundle: str,
    receiver: Receiver,
    broker: AbstractRobustConnection,
    pg_store: Store,
    org: str,
    ledger: Ledger,
    tmp_path: Path,
    figures: Figures,
) -> None:
    env = worker_env(
        postgres_url, amqp_url, ca_bundle,
        secret_keys=TEST_SECRET_KEY, endpoint_concurrency=ENDPOINT_CAP, api_port="0",
    )  # fmt: skip
    workers = [WorkerProcess(dict(env), tmp_path / f"w{i}") for i in range(3)]
    apis = [ApiProcess(dict(env), tmp_path / f"api{i}.log") for i in range(2)]
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        processes: list[WorkerProcess | ApiProcess] = [*workers, *apis]
        for process in processes:
            stack.push_async_callback(process.close)
        for worker in workers:
            worker.log_dir.mkdir()
        await asyncio.gather(*(p.start() for p in processes))
        for process in processes:
            await eventually(process.started, timeout=30, what="process started")
        _, token = await pg_store.tokens.create(org, ("webhooks:manage",), "replicas")

        # Through API #1; the worker processes know them only from the shared database.
        fast = await _create_endpoint(
            http, apis[0], token, receiver, org, "/fast", ["order.created", "order.updated"]
        )
        ledger.track(receiver, fast)
        slow_arrivals = Arrivals(SLOW_SECONDS)
        slow = await _create_endpoint(
            http, apis[0], token, receiver, org, "/slow", ["order.created"]
        )
        ledger.track(receiver, slow, slow_arrivals.serve)

        load = asyncio.create_task(
            publish_load(broker, ledger, org, ORDER_TYPES, scaled(360), 12.0 * scaled(1))
        )
        await eventually(
            lambda: _has_parked(pg_store, slow.webhook_id), timeout=20, what="a parked backlog"
        )
        await receiver.wait_for(lambda r: len(r) >= 30, timeout=20)
        assert not load.done(), "the load ended before the kill"
        await workers[0].kill()
        killed_at = time.monotonic()
        parked_at_kill = await _parked_ids(pg_store, slow.webhook_id)
        await asyncio.sleep(IN_THE_SOCKETS_SECONDS)
        # Answered but not recorded: the dead worker's attempts in flight, and the survivors'
        # not recorded yet (an upper bound of what the kill may send twice).
        unrecorded_at_kill = len(await ledger.unrecorded(pg_store))

        async def taken_over() -> bool:
            return not (parked_at_kill & await _parked_ids(pg_store, slow.webhook_id))

        await eventually(
            taken_over, timeout=ADOPT_SECONDS + 40, what="the parked backlog at the kill released"
        )
        takeover = time.monotonic() - killed_at
        await load
        tally = await _settle(ledger, pg_store, amqp_url, ADOPT_SECONDS + 90, figures)
        settled = time.monotonic() - killed_at
        figures(
            f"replicas: parked at the kill={len(parked_at_kill)} released by the others "
            f"within {takeover:.1f}s; every pair settled {settled:.1f}s after the kill; "
            f"in flight at the kill={unrecorded_at_kill} duplicates={tally.duplicates}"
        )
        assert parked_at_kill, "the kill found no parked backlog to take over"
        assert tally.delivered + tally.failed == tally.pairs
        assert workers[0].starts == 1, "the killed worker was not restarted"
        assert all(w.running for w in workers[1:])

        # --- pause through the other API -------------------------------------------------
        paused_arrivals = Arrivals(0.3)
        paused = await _create_endpoint(
            http, apis[0], token, receiver, org, "/paused", ["ticket.created"]
        )
        receiver.behaviours[paused.path] = paused_arrivals.serve
        pause_load = Ledger("pause", ledger.seed)
        load = asyncio.create_task(
            publish_load(broker, pause_load, org, ["ticket.created"], scaled(150), 6.0)
        )
        await eventually(
            lambda: _has_parked(pg_store, paused.webhook_id), timeout=20, what="a parked backlog"
        )
        status, body = await _api_call(
            http, apis[1], token, "PATCH", f"/webhooks/{paused.webhook_id}", {"enabled": False}
        )
        returned = time.monotonic()
        assert status == 200, body
        assert body["enabled"] is False
        skipped_before = sum(w.log_count(SKIPPED) for w in workers[1:])
        await load
        # Every task of the paused endpoint comes round and is skipped: its parked backlog is
        # released, and what waits in the queues (deferred ones included) is consumed.
        await eventually(
            lambda: _paused_drained(pg_store, paused.webhook_id, amqp_url),
            timeout=60,
            what="the paused endpoint's backlog released and queues drained",
        )
        in_flight = [a for a in paused_arrivals.at if a <= returned]
        late = sorted(a - returned for a in paused_arrivals.at if a > returned)
        skipped = sum(w.log_count(SKIPPED) for w in workers[1:]) - skipped_before
        figures(
            f"pause: requests before the PATCH returned={len(in_flight)} after={len(late)} "
            f"(latest +{max(late, default=0.0) * 1000:.0f} ms); "
            f"attempts skipped by the workers afterwards={skipped}"
        )
        assert in_flight, "nothing was delivered to the endpoint before the pause"
        assert skipped > 0, "the pause met no pending work: it proved nothing"
        assert not [s for s in late if s > ON_THE_WIRE_SECONDS], late

        for worker in workers[1:]:
            code, _ = await worker.terminate()
            assert code == 0, worker.tail()
        for api in apis:
            assert await api.terminate() == 0


async def _has_parked(store: Store, webhook_id: str) -> bool:
    return await store.parked.count(webhook_id) > 0


async def _paused_drained(store: Store, webhook_id: str, amqp_url: str) -> bool:
    return not await _has_parked(store, webhook_id) and await queues_idle(amqp_url, TEST_SCHEDULE)


async def _progress(receiver: Receiver, at_least: int) -> None:
    """Wait until the receiver has seen ``at_least`` more requests than now."""
    target = len(receiver.received) + at_least
    await receiver.wait_for(lambda r: len(r) >= target, timeout=60)


# --- 2. PostgreSQL restart --------------------------------------------------------------------


async def _run(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    if process.returncode:
        raise RuntimeError(f"{' '.join(args)}: {out.decode(errors='replace')[-800:]}")
    return out.decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Cluster:
    version: str
    name: str
    port: int

    async def pg_ctl(self, *args: str) -> None:
        await _run("pg_ctlcluster", self.version, self.name, *args)


def _newest_version() -> str:
    """The newest PostgreSQL major version Debian's cluster tools know (``/etc/postgresql``)."""
    versions = sorted((p.name for p in Path("/etc/postgresql").iterdir()), key=float)
    if not versions:
        pytest.fail("no PostgreSQL cluster tools: /etc/postgresql is empty")
    return versions[-1]


@pytest.fixture
async def own_cluster() -> AsyncIterator[Cluster]:
    """A PostgreSQL cluster of this test's own, with one migrated database; dropped after."""
    cluster = Cluster(_newest_version(), f"sfwchaos{secrets.token_hex(4)}", _free_port())
    await _run(
        "pg_createcluster", cluster.version, cluster.name, "-p", str(cluster.port),
        "--", "--auth=trust",
    )  # fmt: skip
    try:
        await cluster.pg_ctl("start")
        yield cluster
    finally:
        await _run("pg_dropcluster", "--stop", cluster.version, cluster.name)


async def test_postgres_restart_under_load(
    own_cluster: Cluster,
    amqp_url: str,
    ca_bundle: str,
    receiver: Receiver,
    broker: AbstractRobustConnection,
    org: str,
    ledger: Ledger,
    tmp_path: Path,
    figures: Figures,
) -> None:
    admin = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{own_cluster.port}/postgres")
    try:
        await admin.execute('CREATE DATABASE "webhooks"')
    finally:
        await admin.close()
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{own_cluster.port}/webhooks"
    engine = database.create_engine(url)
    worker = WorkerProcess(
        worker_env(url, amqp_url, ca_bundle, secret_keys=TEST_SECRET_KEY), tmp_path
    )
    try:
        await database.migrate(engine)
        store = Store(engine, SecretBox([TEST_SECRET_KEY]))
        await ledger.add_endpoint(store, receiver, org, "/all", ["order.created", "order.updated"])
        await ledger.add_endpoint(store, receiver, org, "/created", ["order.created"])
        await worker.start()
        await eventually(worker.started, timeout=30, what="worker started")
        load = asyncio.create_task(
            publish_load(broker, ledger, org, ORDER_TYPES, scaled(500), 16.0 * scaled(1))
        )
        restarts: list[float] = []
        for _ in range(2):
            await _progress(receiver, 80)
            assert not load.done(), "the load ended before the restart"
            started = time.monotonic()
            await own_cluster.pg_ctl("restart", "-m", "fast")
            restarts.append(time.monotonic() - started)
            assert worker.running, worker.tail()
        at_last_restart = len(receiver.received)
        await load
        tally = await _settle(ledger, store, amqp_url, 90, figures)
        figures(
            f"postgres restart: {len(restarts)} fast restarts "
            f"({', '.join(f'{s:.1f}s' for s in restarts)}); worker starts={worker.starts}; "
            f"'database unreachable' logged {worker.log_count('database unreachable')}x"
        )
        assert worker.starts == 1
        assert len(receiver.received) > at_last_restart, "nothing delivered after the restart"
        assert tally.delivered == tally.pairs
        code, _ = await worker.terminate()
        assert code == 0, worker.tail()
    finally:
        await worker.close()
        await engine.dispose()
