"""Fixtures over the machine's real services: RabbitMQ, PostgreSQL, SQLite, HTTPS receivers.

Each test session gets its own RabbitMQ virtual host and its own PostgreSQL database, so the
topology keeps the names of the contract and runs never see each other's messages. Every
test uses fresh organization ids, so tests sharing a backend do not see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import ssl
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
import trustme
from aiohttp import web

from worker import runtime
from worker.settings import Settings
from worker.store import Store, database
from worker.store.crypto import SecretBox, generate_key

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
# The key sealing signing secrets in every process a test starts, in-process or not.
TEST_SECRET_KEY = generate_key()


# Tests that inject faults under load or measure rates across worker processes run one after
# another on one xdist worker (``--dist loadgroup``), so that no two of them share the machine;
# the rest, the bench's smoke run among them (it measures nothing), share the others.
SERIAL_MODULES = frozenset({"test_rate_limit.py", "test_worker_processes.py"})

Figures = Callable[[str], None]


# First: xdist's own hook reads the group marks to put the groups in the test ids.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("chaos") or item.path.name in SERIAL_MODULES:
            item.add_marker(pytest.mark.xdist_group("serial"))


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    """Report a line of a scenario's figures. It is kept with the test's report and listed in
    the run's "figures" summary, also from xdist's workers, whose output is not shown; it is
    printed too, so that ``-n 0 -s`` shows it as it comes and a failure's output holds it."""

    def report(line: str) -> None:
        request.node.user_properties.append(("figures", line))
        print(line)  # noqa: T201 - see above

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        f"{report.nodeid}: {value}"
        for category in ("passed", "failed")
        for report in terminalreporter.stats.get(category, [])
        if getattr(report, "when", None) == "call"
        for name, value in report.user_properties
        if name == "figures"
    ]
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def secret_keys_env() -> Iterator[str]:
    """Worker subprocesses open secrets that the in-process service sealed: same key."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SELLFERN_WEBHOOKS_SECRET_KEYS", TEST_SECRET_KEY)
        yield TEST_SECRET_KEY


def _rabbitmqctl(*args: str) -> None:
    # The broker's own CLI, on PATH; the arguments are this module's.
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)  # noqa: S603, S607


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A fresh virtual host for this test session, deleted at the end."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl not found: RabbitMQ must be installed and running")
    vhost = f"sfw-test-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"{AMQP_BASE}/{vhost}"
    _rabbitmqctl("delete_vhost", vhost)


@asynccontextmanager
async def fresh_postgres(prefix: str = "sfw_test") -> AsyncIterator[str]:
    """An empty PostgreSQL database of its own, dropped afterwards; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def connection_name() -> str:
    """The running test's id, as a broker connection's name (its tools show who opened it),
    cut short: a parametrized test's id can hold its whole parameter, and a handshake that
    outgrows the broker's first frame is reset."""
    return os.environ.get("PYTEST_CURRENT_TEST", "")[:200]


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A publisher's connection, named after the test so the broker's tools show who opened it;
    after a lost connection (the fault-injection scenarios) it retries every second, not every
    five (the default)."""
    connection = await aio_pika.connect_robust(
        amqp_url,
        client_properties={"connection_name": connection_name()},
        reconnect_interval=1,
    )
    yield connection
    await connection.close()


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped at the end."""
    async with fresh_postgres() as url:
        engine = database.create_engine(url)
        await database.migrate(engine)
        await engine.dispose()
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that asks for a database runs once on SQLite and once on PostgreSQL.

    SQLite files are created and migrated by the first process that opens them, as in
    production on one machine.
    """
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'webhooks.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    engine = database.create_engine(database_url)
    await database.ensure_schema(engine, auto_migrate=True)
    yield Store(engine, SecretBox([TEST_SECRET_KEY]))
    await engine.dispose()


@pytest.fixture
async def pg_store(postgres_url: str) -> AsyncIterator[Store]:
    """A store on the session's PostgreSQL database, for tests that run PostgreSQL only."""
    engine = database.create_engine(postgres_url)
    yield Store(engine, SecretBox([TEST_SECRET_KEY]))
    await engine.dispose()


@pytest.fixture
def org() -> str:
    return f"org_{secrets.token_hex(6)}"


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 15, what: str = "condition"
) -> None:
    """Poll ``check`` until it holds.

    For state that lives in the database or another process, where there is no event to wait
    on; everything in this process is awaited through events instead.
    """
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - polling another process's state
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what} did not hold within {timeout}s")


# --- HTTPS receivers -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_bundle(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


async def _ok(_request: web.Request, _n: int) -> web.StreamResponse:
    return web.Response(text="ok")


@dataclass
class Receiver:
    """An HTTPS server on 127.0.0.1 that records what it receives.

    ``behaviours[path]`` decides the answer; it gets the request and how many requests that
    path had before it.
    """

    base_url: str = ""
    received: list[Received] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    # Requests so far by path: what a behaviour is told, without a scan of ``received``.
    _per_path: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = self._per_path[request.path]
        self._per_path[request.path] += 1
        behaviour = self.behaviours.get(request.path, _ok)
        try:
            return await behaviour(request, seen)
        finally:
            async with self._changed:
                self.received.append(Received(request.path, dict(request.headers), body))
                self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = 15
    ) -> list[Received]:
        """Wait until ``predicate(received)`` holds; fail the test after ``timeout`` seconds."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.received))
        return self.received


@asynccontextmanager
async def run_receiver(tls_ca: trustme.CA) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.base_url = f"https://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        await runner.cleanup()


@pytest.fixture
async def receiver(tls_ca: trustme.CA) -> AsyncIterator[Receiver]:
    async with run_receiver(tls_ca) as r:
        yield r


# --- the service ---------------------------------------------------------------------------


def make_settings(database_url: str, amqp_url: str, ca_bundle: str, **overrides: Any) -> Settings:  # noqa: ANN401
    values: dict[str, Any] = {
        "database_url": database_url,
        "amqp_url": amqp_url,
        "api_host": "127.0.0.1",
        "api_port": 0,
        "metrics_port": 0,
        "ca_bundle": ca_bundle,
        "allowed_private_networks": "127.0.0.0/8",
        "retry_schedule": "0.3,0.3",
        "delivery_timeout": 5,
        "log_format": "console",
        "shutdown_drain_seconds": 5,
        "secret_keys": TEST_SECRET_KEY,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@dataclass
class Service:
    running: runtime.Running
    http: aiohttp.ClientSession
    token: str
    org: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.running.api_port}"

    @property
    def store(self) -> Store:
        return self.running.store

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,  # noqa: ANN401
        token: str | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with self.http.request(
            method, f"{self.base}/api/v2{path}", json=json, headers=headers, **kwargs
        ) as response:
            body = await response.json() if response.content_type == "application/json" else None
            return response.status, body

    async def token_for(self, org: str, scopes: tuple[str, ...] = ("webhooks:manage",)) -> str:
        _, plaintext = await self.store.tokens.create(org, scopes, "test")
        return plaintext


@asynccontextmanager
async def run_service(
    settings: Settings, role: runtime.Role = "serve"
) -> AsyncIterator[runtime.Running]:
    """Run a process in-process until the block ends, then shut it down as SIGTERM would."""
    stop = asyncio.Event()
    started: asyncio.Future[runtime.Running] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        runtime.run(settings, role, stop=stop, started=started.set_result, handle_signals=False)
    )
    try:
        waiting: list[asyncio.Future[object]] = [task, started]  # type: ignore[list-item]
        await asyncio.wait(waiting, timeout=30, return_when="FIRST_COMPLETED")
        if task.done():
            task.result()  # raises what went wrong at start-up
        if not started.done():
            pytest.fail("service did not start within 30s")
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def service_factory(
    database_url: str, amqp_url: str, ca_bundle: str, org: str
) -> AsyncIterator[ServiceFactory]:
    """Start the service (API and worker in one process) with settings overrides."""
    async with aiohttp.ClientSession() as http, AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Service:  # noqa: ANN401
            settings = make_settings(database_url, amqp_url, ca_bundle, **overrides)
            running = await stack.enter_async_context(run_service(settings))
            _, token = await running.store.tokens.create(org, ("webhooks:manage",), "test")
            return Service(running, http, token, org)

        yield start


@pytest.fixture
async def service(service_factory: ServiceFactory) -> Service:
    return await service_factory()
