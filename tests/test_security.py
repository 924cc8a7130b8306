"""Security properties: isolation between organizations, secrets at rest, rate limits, keys.

Everything runs against the real service, databases and command line; the rate limiter's
own arithmetic is also checked with a fake clock.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
import standardwebhooks
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from tests.conftest import (
    TEST_SECRET_KEY,
    Receiver,
    Service,
    ServiceFactory,
    fresh_postgres,
)
from tests.test_guard import StaticResolver
from worker.api.ratelimit import RateLimiter
from worker.pipeline import guard
from worker.settings import Settings, SettingsError
from worker.store import Store, crypto, database
from worker.store.tables import webhooks
from worker.store.tokens import hash_token

pytestmark = pytest.mark.timeout(90)


def _cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command line as an operator would, with only the given settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SELLFERN_WEBHOOKS_")}
    return subprocess.run(  # noqa: S603 - our own entry point
        [sys.executable, "-m", "worker.cli", *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


async def _create(service: Service, receiver: Receiver, token: str | None = None) -> dict[str, Any]:
    body = {"url": receiver.url("/hook"), "events": ["order.created"]}
    status, created = await service.call("POST", "/webhooks", body, token)
    assert status == 201, created
    return created  # type: ignore[no-any-return]


# --- organizations ---------------------------------------------------------------------------


async def test_every_route_hides_other_organizations(service: Service, receiver: Receiver) -> None:
    """Driven by the OpenAPI document, so a new route is covered the day it is added."""
    mine = await _create(service, receiver)
    status, attempt = await service.call("POST", f"/webhooks/{mine['id']}/test")
    assert status == 200
    other_org = f"org_other_{uuid.uuid4().hex[:8]}"
    other = await service.token_for(other_org)
    theirs = await _create(service, receiver, token=other)

    async with service.http.get(f"{service.base}/api/v2/openapi.json") as response:
        document = await response.json()
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    status, recovery = await service.call(
        "POST", f"/webhooks/{mine['id']}/recover", {"since": since}
    )
    assert status == 202, recovery
    routes = [
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters" and ("{webhook_id}" in path or "{event_id}" in path)
    ]
    assert len(routes) >= 10
    ids = {
        "webhook_id": mine["id"],
        "attempt_id": attempt["id"],
        "recovery_id": recovery["id"],
        "event_id": attempt["event_id"],
    }
    for method, template in routes:
        path = template.format(**ids)
        body: dict[str, Any] | None = None
        if method == "PATCH":
            body = {"enabled": False}
        elif path.endswith("/recover"):
            body = {"since": since}
        status, answer = await service.call(method, path, body, token=other)
        assert (status, answer["error"]["code"]) == (404, "not_found"), (method, path)

    # Their own endpoint does not reach my attempts either.
    status, answer = await service.call(
        "POST", f"/webhooks/{theirs['id']}/deliveries/{attempt['id']}/retry", token=other
    )
    assert (status, answer["error"]["code"]) == (404, "not_found")
    status, listing = await service.call("GET", f"/webhooks/{theirs['id']}/deliveries", token=other)
    assert listing["data"] == []
    # Lists show one's own only, whatever the cursor.
    for query in ("", f"?cursor={mine['id']}z", "?limit=100"):
        status, listing = await service.call("GET", f"/webhooks{query}", token=other)
        assert status == 200
        assert [w["id"] for w in listing["data"]] in ([theirs["id"]], [])
    status, listing = await service.call("GET", "/webhooks")
    assert [w["id"] for w in listing["data"]] == [mine["id"]]

    # Nothing the other organization tried changed anything of mine.
    status, fetched = await service.call("GET", f"/webhooks/{mine['id']}")
    assert fetched["enabled"] is True
    stored = await service.store.endpoints.get(mine["id"])
    assert stored is not None
    assert stored.secret == mine["secret"]
    assert stored.previous_secret is None  # rotate-secret did not run
    status, listing = await service.call("GET", f"/webhooks/{mine['id']}/deliveries")
    assert [a["id"] for a in listing["data"]] == [attempt["id"]]  # retry did not run


async def test_secret_is_returned_only_on_create_and_rotation(
    service: Service, receiver: Receiver
) -> None:
    created = await _create(service, receiver)
    secret = created["secret"]
    status, rotated = await service.call("POST", f"/webhooks/{created['id']}/rotate-secret")
    assert status == 200
    new_secret = rotated["secret"]
    assert new_secret != secret
    webhook = f"{service.base}/api/v2/webhooks/{created['id']}"
    headers = {"Authorization": f"Bearer {service.token}"}
    for method, url, json in (
        ("GET", webhook, None),
        ("GET", f"{service.base}/api/v2/webhooks", None),
        ("PATCH", webhook, {"description": "x"}),
        ("POST", f"{webhook}/test", None),
        ("GET", f"{webhook}/deliveries", None),
    ):
        async with service.http.request(method, url, json=json, headers=headers) as response:
            text = await response.text()
        assert response.status == 200, text
        for value in (secret, new_secret, secret.removeprefix("whsec_")):
            assert value not in text, (method, url)
        assert '"secret"' not in text


# --- secrets at rest -------------------------------------------------------------------------


async def _dump(database_url: str) -> str:
    """Every row of every table, as the database holds it, in one string."""
    if database_url.startswith("sqlite"):
        path = make_url(database_url).database
        assert path

        def read() -> str:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
                tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master "
                                                           "WHERE type = 'table'")]  # fmt: skip
                rows = [
                    repr(row)
                    for table in tables
                    for row in connection.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from the catalogue
                ]
            # And the files themselves, write-ahead log included.
            raw = [Path(p).read_bytes().decode("latin-1") for p in (path, f"{path}-wal")
                   if Path(p).exists()]  # fmt: skip
            return "\n".join([*tables, *rows, *raw])

        return await asyncio.to_thread(read)
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    try:
        tables = [
            r["tablename"]
            for r in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        ]
        rows = [
            repr(dict(row))
            for table in tables
            for row in await connection.fetch(f'SELECT * FROM "{table}"')  # noqa: S608 - names from the catalogue
        ]
    finally:
        await connection.close()
    return "\n".join([*tables, *rows])


async def test_database_holds_no_plaintext_secret_or_token(
    service: Service, receiver: Receiver
) -> None:
    first = await _create(service, receiver)
    second = await _create(service, receiver)
    status, rotated = await service.call("POST", f"/webhooks/{first['id']}/rotate-secret")
    assert status == 200
    other_token = await service.token_for(service.org)
    status, _ = await service.call("POST", f"/webhooks/{second['id']}/test", token=other_token)
    assert status == 200

    dump = await _dump(service.running.settings.database_url)
    assert first["id"] in dump  # the dump did read the rows
    assert hash_token(service.token) in dump
    for secret in (first["secret"], second["secret"], rotated["secret"]):
        assert secret not in dump
        assert secret.removeprefix("whsec_") not in dump
    for token in (service.token, other_token):
        assert token not in dump
        assert token.removeprefix("sfw_") not in dump

    # And what is stored opens, with the service's key, to what the customer was given.
    stored = await service.store.endpoints.get(first["id"])
    assert stored is not None
    assert (stored.secret, stored.previous_secret) == (rotated["secret"], first["secret"])


async def test_secrets_are_never_logged(service: Service, receiver: Receiver) -> None:
    with capture_logs() as logs:
        created = await _create(service, receiver)
        status, rotated = await service.call("POST", f"/webhooks/{created['id']}/rotate-secret")
        await service.call("POST", f"/webhooks/{created['id']}/test")
    assert status == 200
    assert logs, "the API logs these calls"
    rendered = repr(logs)
    for secret in (created["secret"], rotated["secret"], service.token):
        assert secret not in rendered
    stored = await service.store.endpoints.get(created["id"])
    assert stored is not None
    assert stored.secret not in repr(stored)  # an endpoint logged whole shows no secret
    assert created["secret"] not in repr(stored)


# --- keys ------------------------------------------------------------------------------------


def test_secret_box_seals_opens_and_rotates() -> None:
    old, new = crypto.generate_key(), crypto.generate_key()
    box = crypto.SecretBox([old])
    sealed = box.seal("whsec_abc")
    assert sealed != "whsec_abc"
    assert "whsec" not in sealed
    assert box.open(sealed) == "whsec_abc"
    assert not box.needs_rotation(sealed)

    rotating = crypto.SecretBox([new, old])
    assert rotating.open(sealed) == "whsec_abc"
    assert rotating.needs_rotation(sealed)
    resealed = rotating.reseal(sealed)
    assert not rotating.needs_rotation(resealed)
    assert crypto.SecretBox([new]).open(resealed) == "whsec_abc"
    with pytest.raises(crypto.SecretBoxError):
        box.open(resealed)
    # A value from before encryption at rest opens as it is, and is due for sealing.
    assert rotating.open("whsec_legacy") == "whsec_legacy"
    assert rotating.needs_rotation("whsec_legacy")


def _settings(**values: Any) -> Settings:  # noqa: ANN401
    # The test session puts a key in the environment for its subprocesses; not here.
    return Settings.model_validate({"secret_keys": "", **values})


def test_key_policy(tmp_path: Path) -> None:
    key = crypto.generate_key()
    explicit = crypto.load_box(_settings(secret_keys=key, database_url="postgresql+asyncpg://h/d"))
    assert crypto.SecretBox([key]).open(explicit.seal("x")) == "x"

    with pytest.raises(SettingsError, match="SELLFERN_WEBHOOKS_SECRET_KEYS"):
        crypto.load_box(_settings(database_url="postgresql+asyncpg://h/d"))

    with capture_logs() as logs:
        dev = crypto.load_box(_settings(database_url="postgresql+asyncpg://h/d", dev_mode=True))
    assert crypto.SecretBox([crypto.DEV_KEY]).open(dev.seal("x")) == "x"
    assert [e["log_level"] for e in logs] == ["warning"]
    assert "DEV_MODE" in logs[0]["event"]

    url = f"sqlite+aiosqlite:///{tmp_path / 'one.db'}"
    with capture_logs() as logs:
        first = crypto.load_box(_settings(database_url=url))
    key_file = tmp_path / "one.db.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert logs[0]["key_file"] == str(key_file)
    assert key_file.read_text().strip() not in repr(logs)
    with capture_logs() as logs:
        again = crypto.load_box(_settings(database_url=url))
    assert logs == []  # only the first start says it generated a key
    assert again.open(first.seal("x")) == "x"


def test_key_file_is_created_once_under_a_race(tmp_path: Path) -> None:
    path = tmp_path / "race.db.key"
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        results.append(crypto._read_or_create_key_file(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({key for key, _ in results}) == 1
    assert sum(created for _, created in results) <= 1
    assert [p.name for p in tmp_path.iterdir()] == ["race.db.key"]  # no temporary left


def test_bad_secret_keys_stop_start_up_without_echoing_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SELLFERN_WEBHOOKS_SECRET_KEYS", f"{crypto.generate_key()},hunter2")
    with pytest.raises(SettingsError) as error:
        Settings.load()
    assert "SELLFERN_WEBHOOKS_SECRET_KEYS" in str(error.value)
    assert "key 2" in str(error.value)
    assert "hunter2" not in str(error.value)
    settings = _settings(secret_keys=TEST_SECRET_KEY)
    assert TEST_SECRET_KEY not in repr(settings)


@pytest.mark.parametrize("command", ["serve", "api", "worker", "rotate-keys"])
def test_postgres_without_keys_refuses_to_start(postgres_url: str, command: str) -> None:
    result = _cli(command, env={"SELLFERN_WEBHOOKS_DATABASE_URL": postgres_url})
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "SELLFERN_WEBHOOKS_SECRET_KEYS" in result.stderr
    assert "DEV_MODE" in result.stderr


async def test_sqlite_quick_start_generates_its_key_once(tmp_path: Path, amqp_url: str) -> None:
    """``serve`` with no key on SQLite: the README's quick start."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SELLFERN_WEBHOOKS_")},
        "SELLFERN_WEBHOOKS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'quick.db'}",
        "SELLFERN_WEBHOOKS_AMQP_URL": amqp_url,
        "SELLFERN_WEBHOOKS_API_HOST": "127.0.0.1",
        "SELLFERN_WEBHOOKS_API_PORT": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.cli", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any('"started"' in line for line in lines):
                line = (await process.stderr.readline()).decode()
                assert line, f"serve exited: {lines}"
                lines.append(line)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    key_file = tmp_path / "quick.db.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert any("generated the key" in line and str(key_file) in line for line in lines)
    assert key_file.read_text().strip() not in "".join(lines)
    Fernet(key_file.read_text().strip())  # a usable key


@pytest.fixture(params=["sqlite", "postgresql"])
async def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated database of its own: rotate-keys rewrites every row of the database given."""
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
        else:
            url = await stack.enter_async_context(fresh_postgres("sfw_keys"))
        engine = database.create_engine(url)
        await database.migrate(engine)
        await engine.dispose()
        yield url


async def test_rotate_keys_reseals_every_secret(fresh_database_url: str) -> None:
    old, new = crypto.generate_key(), crypto.generate_key()
    engine = database.create_engine(fresh_database_url)
    try:
        store = Store(engine, crypto.SecretBox([old]))
        made = [
            await store.endpoints.create(
                "org_keys", f"https://example.com/{i}", ["order.created"], "", enabled=True
            )
            for i in range(3)
        ]
        rotated = await store.endpoints.rotate_secret(
            "org_keys", made[0].id, overlap=timedelta(days=1)
        )
        assert rotated is not None
        # One row as written before encryption at rest: plaintext, to be sealed by rotate-keys.
        async with engine.begin() as connection:
            await connection.execute(
                webhooks.update().where(webhooks.c.id == made[1].id).values(secret=made[1].secret)
            )
        expected = {
            made[0].id: (rotated.secret, made[0].secret),
            made[1].id: (made[1].secret, None),
            made[2].id: (made[2].secret, None),
        }

        env = {
            "SELLFERN_WEBHOOKS_DATABASE_URL": fresh_database_url,
            "SELLFERN_WEBHOOKS_SECRET_KEYS": f"{new},{old}",
        }
        result = await asyncio.to_thread(_cli, "rotate-keys", env=env)
        assert result.returncode == 0, result.stderr
        assert re.search(r"re-encrypted 3 .* 0 already", result.stdout), result.stdout
        again = await asyncio.to_thread(_cli, "rotate-keys", env=env)
        assert re.search(r"re-encrypted 0 .* 3 already", again.stdout), again.stdout

        # The old key can go: the new one alone opens everything, to the same secrets.
        only_new = Store(engine, crypto.SecretBox([new]))
        for webhook_id, (secret, previous) in expected.items():
            webhook = await only_new.endpoints.get(webhook_id)
            assert webhook is not None
            assert (webhook.secret, webhook.previous_secret) == (secret, previous)
        async with engine.connect() as connection:
            rows = (await connection.execute(sa.select(webhooks))).all()
        for row in rows:
            for value in (row.secret, row.previous_secret):
                if value is None:
                    continue
                assert not value.startswith("whsec_")
                with pytest.raises(InvalidToken):
                    Fernet(old).decrypt(value)
        with pytest.raises(crypto.SecretBoxError):
            await Store(engine, crypto.SecretBox([old])).endpoints.get(made[2].id)
    finally:
        await engine.dispose()


async def test_dev_mode_starts_on_postgres_with_a_loud_warning() -> None:
    async with fresh_postgres("sfw_keys") as url:
        migrated = await asyncio.to_thread(
            _cli, "migrate", env={"SELLFERN_WEBHOOKS_DATABASE_URL": url}
        )
        assert migrated.returncode == 0, migrated.stderr
        env = {"SELLFERN_WEBHOOKS_DATABASE_URL": url, "SELLFERN_WEBHOOKS_DEV_MODE": "true"}
        result = await asyncio.to_thread(_cli, "rotate-keys", env=env)
    assert result.returncode == 0, result.stderr
    assert "DEV_MODE" in result.stderr
    assert '"warning"' in result.stderr


async def test_rotated_secrets_still_sign_after_key_rotation(
    service_factory: ServiceFactory, receiver: Receiver
) -> None:
    """Deliveries keep verifying with the customer's secret across a key rotation."""
    new = crypto.generate_key()
    service = await service_factory(secret_keys=f"{new},{TEST_SECRET_KEY}")
    created = await _create(service, receiver)
    status, attempt = await service.call("POST", f"/webhooks/{created['id']}/test")
    assert (status, attempt["success"]) == (200, True)
    received = receiver.at("/hook")[-1]
    standardwebhooks.Webhook(created["secret"]).verify(received.body, received.headers)


# --- rate limit ------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(service_factory: ServiceFactory) -> None:
    service = await service_factory(rate_limit_per_second=0.25, rate_limit_burst=3)
    for _ in range(3):
        status, _ = await service.call("GET", "/webhooks")
        assert status == 200
    async with service.http.get(
        f"{service.base}/api/v2/webhooks", headers={"Authorization": f"Bearer {service.token}"}
    ) as response:
        body = await response.json()
        assert response.status == 429
        assert body["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 4
    # Per token: another token of the same organization is not held back.
    other = await service.token_for(service.org)
    status, _ = await service.call("GET", "/webhooks", token=other)
    assert status == 200
    # Unauthenticated calls are refused as such, not counted against anyone.
    status, body = await service.call("GET", "/webhooks", token="sfw_nobody")
    assert (status, body["error"]["code"]) == (401, "invalid_token")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_arithmetic() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2, burst=4, clock=clock)
    assert [limiter.acquire("a") for _ in range(4)] == [0, 0, 0, 0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0  # buckets are per key
    clock.now += 0.5
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 60  # refills, but never past the burst
    assert [limiter.acquire("a") for _ in range(5)][-1] == pytest.approx(0.5)
    clock.now -= 10  # a clock that steps back refills nothing and breaks nothing
    assert limiter.acquire("a") > 0


def test_token_bucket_table_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.api.ratelimit.PRUNE_ABOVE", 10)
    clock = FakeClock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    for i in range(10):
        limiter.acquire(f"idle{i}")
    clock.now += 5  # long enough for every bucket to be full again
    limiter.acquire("fresh")
    assert len(limiter) == 1


async def test_dns_rebinding_is_caught_at_delivery(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Public when the endpoint is saved, private when delivered to: blocked_address."""
    dns = StaticResolver("93.184.216.34")
    # The delivery session resolves through GuardedResolver(inner=DefaultResolver()); make the
    # inner resolver this stand-in for DNS. Everything else is the running service.
    monkeypatch.setattr(guard, "DefaultResolver", lambda: dns)
    service = await service_factory()
    host = "rebind.example"
    allowed = service.running.settings.allowed_private_networks
    await guard.check_host(host, allowed, resolver=dns)  # what the API does on save
    webhook = await service.store.endpoints.create(
        service.org, f"https://{host}/hook", ["order.created"], "", enabled=True
    )

    dns.answers = ["10.0.0.7"]  # the record changes after the check
    status, attempt = await service.call("POST", f"/webhooks/{webhook.id}/test")
    assert status == 200, attempt
    assert attempt["success"] is False
    assert attempt["status_code"] is None
    assert attempt["error"]["kind"] == "blocked_address"
    assert "10.0.0.7" in attempt["error"]["message"]
    assert dns.asked == [host, host]  # one lookup to save, one to connect: no second one

    status, listing = await service.call("GET", f"/webhooks/{webhook.id}/deliveries")
    assert status == 200
    assert [a["error"]["kind"] for a in listing["data"]] == ["blocked_address"]


@pytest.mark.parametrize("host", ["LOCALHOST.", "metadata.google.internal", "nas.local"])
async def test_special_use_host_names_are_refused_at_creation(
    service_factory: ServiceFactory, host: str
) -> None:
    service = await service_factory(allowed_private_networks="10.99.0.0/16")
    status, body = await service.call(
        "POST", "/webhooks", {"url": f"https://{host}/h", "events": ["order.created"]}
    )
    assert status == 400, body
    assert body["error"]["code"] == "validation_error"
    assert body["error"]["message"].startswith("url: not publicly reachable")
    status, listing = await service.call("GET", "/webhooks")
    assert listing["data"] == []
