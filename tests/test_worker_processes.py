"""``WORKER_PROCESSES``: one parent process, several worker children, one set of figures.

The parent runs as an operator runs it, ``python -m worker.cli worker`` with
``WORKER_PROCESSES=2``, against PostgreSQL, a RabbitMQ virtual host of each test's own (so the
broker's consumer count is the children's alone) and a real HTTPS receiver.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
import pytest
import sqlalchemy as sa
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from schemas.publish import publish_event
from tests.chaos_support import rabbitmqctl, worker_env
from tests.conftest import AMQP_BASE, Receiver, eventually
from worker.pipeline import topology
from worker.settings import Settings, SettingsError
from worker.store import Store
from worker.store.tables import attempts
from worker.supervisor import backoff, check_supported

EVENT_TYPE = "order.created"
ATTEMPTS = "sellfern_webhooks_delivery_attempts_total"
RESTARTS = "sellfern_webhooks_worker_restarts_total"
DRAIN_SECONDS = 5  # worker_env's SHUTDOWN_DRAIN_SECONDS


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def exists(path: Path) -> bool:
    return path.exists()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(): v.decode(errors="replace") for k, _, v in pairs}


def metric_sum(text: str, sample_name: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name
    )


async def fetch(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        return r.status, await r.text()


async def deliveries_consumers(amqp_url: str) -> int:
    """Consumers of webhooks.deliveries as the broker counts them now (a fresh passive declare
    on the underlying channel: a robust channel caches its first answer)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(topology.DELIVERIES_QUEUE, passive=True)
        return int(declared.consumer_count or 0)
    except aio_pika.exceptions.ChannelClosed:
        return 0  # not declared yet
    finally:
        await connection.close()


@pytest.fixture
async def vhost_url() -> AsyncIterator[str]:
    name = f"sfw-processes-{uuid.uuid4().hex[:10]}"
    await rabbitmqctl("add_vhost", name)
    await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield f"{AMQP_BASE}/{name}"
    await rabbitmqctl("delete_vhost", name)


@dataclass
class Parent:
    process: asyncio.subprocess.Process
    metrics_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        return children_of(self.process.pid)

    async def ready(self) -> bool:
        if self.process.returncode is not None:
            raise AssertionError(f"parent exited with {self.process.returncode}: {self.log()}")
        try:
            status, _ = await fetch(self.metrics_port, "/readyz")
        except aiohttp.ClientError:
            return False
        return status == 200

    async def metrics(self) -> str:
        status, text = await fetch(self.metrics_port, "/metrics")
        assert status == 200
        return text


@pytest.fixture
async def parent(
    postgres_url: str, vhost_url: str, ca_bundle: str, tmp_path: Path
) -> AsyncIterator[Parent]:
    """The parent with two children, ready (every child's /readyz said so)."""
    port = _free_port()
    env = worker_env(postgres_url, vhost_url, ca_bundle, worker_processes="2",
                     metrics_port=str(port))  # fmt: skip
    log_path = tmp_path / "parent.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker.cli", "worker", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    running = Parent(process, port, log_path)
    try:
        await eventually(running.ready, timeout=60, what="the parent ready")
        yield running
    finally:
        if process.returncode is None:
            for child in running.children():
                os.kill(child, signal.SIGKILL)
            process.kill()
            await process.wait()


async def add_endpoint(store: Store, receiver: Receiver, path: str) -> tuple[str, str]:
    org = f"org_{uuid.uuid4().hex[:10]}"
    webhook = await store.endpoints.create(org, receiver.url(path), [EVENT_TYPE], "p", enabled=True)
    return org, webhook.id


async def publish(amqp_url: str, org: str, count: int) -> list[str]:
    connection = await aio_pika.connect(amqp_url)
    try:
        return [(await publish_event(connection, EVENT_TYPE, org, {"i": i})).id
                for i in range(count)]  # fmt: skip
    finally:
        await connection.close()


def delivered(receiver: Receiver, path: str) -> set[str]:
    return {r.headers.get("webhook-id", "") for r in receiver.at(path)}


async def test_two_children_consume_deliver_and_sum_their_metrics(
    parent: Parent, vhost_url: str, pg_store: Store, receiver: Receiver
) -> None:
    children = parent.children()
    assert len(children) == 2
    assert await deliveries_consumers(vhost_url) == 2
    org, _ = await add_endpoint(pg_store, receiver, "/both")
    ids = await publish(vhost_url, org, 60)
    await receiver.wait_for(lambda _: set(ids) <= delivered(receiver, "/both"), timeout=30)

    ports = [int(environ_of(pid)["SELLFERN_WEBHOOKS_METRICS_PORT"]) for pid in children]

    async def summed() -> bool:
        own = [metric_sum((await fetch(p, "/metrics"))[1], ATTEMPTS) for p in ports]
        total = metric_sum(await parent.metrics(), ATTEMPTS)
        # Each child fanned out and sent its share; the parent shows their sum.
        return all(n > 0 for n in own) and total == sum(own) >= len(ids)

    await eventually(summed, what="the parent's attempts = the sum of both children's")


async def test_a_killed_child_is_restarted_and_nothing_is_lost(
    parent: Parent, vhost_url: str, pg_store: Store, receiver: Receiver
) -> None:
    org, _ = await add_endpoint(pg_store, receiver, "/kill")
    first = await publish(vhost_url, org, 40)
    await receiver.wait_for(lambda _: len(delivered(receiver, "/kill")) >= 5, timeout=30)
    victim = parent.children()[0]
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        now = parent.children()
        return len(now) == 2 and victim not in now and await deliveries_consumers(vhost_url) == 2

    await eventually(replaced, timeout=60, what="a new child in place of the killed one")
    second = await publish(vhost_url, org, 40)
    wanted = set(first) | set(second)
    await receiver.wait_for(lambda _: wanted <= delivered(receiver, "/kill"), timeout=60)
    assert metric_sum(await parent.metrics(), RESTARTS) == 1
    assert "worker process exited; restarting" in parent.log()


async def test_sigterm_drains_every_child_then_exits_zero(
    parent: Parent, vhost_url: str, pg_store: Store, receiver: Receiver
) -> None:
    started: list[str] = []
    four_in_flight = asyncio.Event()

    async def slow(request: web.Request, _n: int) -> web.StreamResponse:
        started.append(request.headers["webhook-id"])
        if len(started) >= 4:
            four_in_flight.set()
        await asyncio.sleep(1.5)  # the receiver's answer time, not synchronisation
        return web.Response(text="ok")

    receiver.behaviours["/slow"] = slow
    org, webhook_id = await add_endpoint(pg_store, receiver, "/slow")
    children = parent.children()
    directory = Path(environ_of(children[0])["PROMETHEUS_MULTIPROC_DIR"])
    assert exists(directory)
    await publish(vhost_url, org, 8)
    await asyncio.wait_for(four_in_flight.wait(), 30)
    in_flight = list(started)

    began = time.monotonic()
    parent.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(parent.process.wait(), DRAIN_SECONDS + 15)
    assert code == 0, parent.log()[-3000:]
    assert time.monotonic() - began < DRAIN_SECONDS + 10
    assert not any(exists(Path(f"/proc/{pid}")) for pid in children)
    assert not exists(directory)
    # What was in flight at SIGTERM was answered and recorded before the children exited.
    query = sa.select(attempts.c.event_id).where(
        attempts.c.webhook_id == webhook_id, attempts.c.success.is_(True)
    )
    async with pg_store.engine.connect() as connection:
        recorded = {row.event_id for row in await connection.execute(query)}
    assert set(in_flight) <= recorded


def test_several_processes_on_sqlite_are_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELLFERN_WEBHOOKS_")}
    env.update({
        "SELLFERN_WEBHOOKS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        "SELLFERN_WEBHOOKS_WORKER_PROCESSES": "2", "SELLFERN_WEBHOOKS_LOG_LEVEL": "error",
    })  # fmt: skip
    for role in ("worker", "serve"):
        result = subprocess.run(  # noqa: S603 - our own entry point
            [sys.executable, "-m", "worker.cli", role],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "SELLFERN_WEBHOOKS_WORKER_PROCESSES=2 needs PostgreSQL" in result.stderr
        assert not (tmp_path / "x.db").exists()


# --- pure logic -------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("SELLFERN_WEBHOOKS_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.unit
@pytest.mark.parametrize(
    ("value", "expected"), [("1", 1), ("4", 4), (" 2 ", 2), ("auto", os.cpu_count() or 1),
                            ("AUTO", os.cpu_count() or 1)],
)  # fmt: skip
def test_worker_processes_parses(clean_env: pytest.MonkeyPatch, value: str, expected: int) -> None:
    clean_env.setenv("SELLFERN_WEBHOOKS_WORKER_PROCESSES", value)
    assert Settings.load().worker_processes == expected


@pytest.mark.unit
def test_worker_processes_defaults_to_one(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings.load().worker_processes == 1


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "", "auto2"])
def test_worker_processes_rejects(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("SELLFERN_WEBHOOKS_WORKER_PROCESSES", value)
    with pytest.raises(SettingsError) as raised:
        Settings.load()
    assert str(raised.value) == (
        f"SELLFERN_WEBHOOKS_WORKER_PROCESSES: expected an integer of at least 1 or auto, "
        f"got {value!r}"
    )


@pytest.mark.unit
def test_sqlite_with_several_processes_is_refused_naming_the_setting() -> None:
    sqlite = Settings.model_validate({"worker_processes": 3})
    with pytest.raises(
        SettingsError, match="SELLFERN_WEBHOOKS_WORKER_PROCESSES=3 needs PostgreSQL"
    ):
        check_supported(sqlite)
    check_supported(Settings.model_validate({"worker_processes": 1}))
    check_supported(
        Settings.model_validate(
            {"worker_processes": 3, "database_url": "postgresql+asyncpg://db/x"}
        )
    )


@pytest.mark.unit
def test_restart_backoff_doubles_up_to_ten_seconds() -> None:
    assert [backoff(n) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 10, 10]
