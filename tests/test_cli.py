"""The command line, run as an operator runs it: a subprocess with environment variables."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest
import sqlalchemy as sa

from tests.conftest import fresh_postgres
from worker.store import Store, database
from worker.store.tokens import hash_token


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SELLFERN_WEBHOOKS_")}
    full_env.update(env or {})
    return subprocess.run(  # noqa: S603 - our own entry point
        [sys.executable, "-m", "worker.cli", *args],
        env=full_env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"SELLFERN_WEBHOOKS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"}


async def test_token_create_list_revoke(sqlite_env: dict[str, str]) -> None:
    created = run_cli("token", "create", "--org", "org_cli", "--scope", "webhooks:manage",
                      "--name", "ci", env=sqlite_env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    token = lines[-1]
    assert token.startswith("sfw_")
    assert " " not in token
    token_id = lines[0].split()[2]
    assert token_id.startswith("tok_")

    engine = database.create_engine(sqlite_env["SELLFERN_WEBHOOKS_DATABASE_URL"])
    try:
        authenticated = await Store(engine).tokens.authenticate(token)
        assert authenticated is not None
        assert authenticated.org_id == "org_cli"
        assert authenticated.scopes == ("webhooks:manage",)
    finally:
        await engine.dispose()

    listed = run_cli("token", "list", env=sqlite_env)
    assert listed.returncode == 0
    assert token_id in listed.stdout
    assert "active" in listed.stdout
    assert token not in listed.stdout
    assert hash_token(token) not in listed.stdout

    revoked = run_cli("token", "revoke", token_id, env=sqlite_env)
    assert revoked.returncode == 0, revoked.stderr
    again = run_cli("token", "revoke", token_id, env=sqlite_env)
    assert again.returncode == 1
    assert "no active token" in again.stderr
    assert "revoked" in run_cli("token", "list", env=sqlite_env).stdout


def test_token_create_rejects_unknown_scope_and_bad_org(sqlite_env: dict[str, str]) -> None:
    result = run_cli("token", "create", "--org", "org_x", "--scope", "admin", env=sqlite_env)
    assert result.returncode == 2
    assert "argument --scope: 'admin': a scope is resource:action" in result.stderr
    result = run_cli("token", "create", "--org", "org x", "--scope", "webhooks:manage",
                     env=sqlite_env)  # fmt: skip
    assert result.returncode == 2
    assert "--org" in result.stderr


def test_bad_setting_stops_with_one_line_naming_it() -> None:
    result = run_cli("serve", env={"SELLFERN_WEBHOOKS_RETRY_SCHEDULE": "5,later"})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "SELLFERN_WEBHOOKS_RETRY_SCHEDULE" in result.stderr
    result = run_cli("migrate", env={"SELLFERN_WEBHOOKS_DATABASE_URL": "mysql://x/y"})
    assert result.returncode == 2
    assert "SELLFERN_WEBHOOKS_DATABASE_URL" in result.stderr


@pytest.mark.parametrize("role", ["serve", "worker", "api"])
def test_unreachable_broker_or_database_stops_with_one_line_naming_it(
    role: str, tmp_path: Path
) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    no_broker = run_cli(role, env={
        "SELLFERN_WEBHOOKS_DATABASE_URL": database,
        "SELLFERN_WEBHOOKS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
        "SELLFERN_WEBHOOKS_API_PORT": "0", "SELLFERN_WEBHOOKS_METRICS_PORT": "0",
        # Start-up's own info lines (a generated key) aside: the failure is one line.
        "SELLFERN_WEBHOOKS_LOG_LEVEL": "error",
    })  # fmt: skip
    assert no_broker.returncode == 2, no_broker.stderr
    assert no_broker.stderr.count("\n") == 1, no_broker.stderr
    assert "cannot reach the broker at 127.0.0.1:1 (SELLFERN_WEBHOOKS_AMQP_URL)" in no_broker.stderr
    no_database = run_cli(role, env={
        "SELLFERN_WEBHOOKS_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/x",
        "SELLFERN_WEBHOOKS_DEV_MODE": "true", "SELLFERN_WEBHOOKS_LOG_LEVEL": "error",
    })  # fmt: skip
    assert no_database.returncode == 2, no_database.stderr
    assert no_database.stderr.count("\n") == 1, no_database.stderr
    assert "cannot reach the database at 127.0.0.1:1 (SELLFERN_WEBHOOKS_DATABASE_URL)" in (
        no_database.stderr
    )


async def test_postgres_needs_migrate_then_works() -> None:
    async with fresh_postgres("sfw_cli") as url:
        env = {"SELLFERN_WEBHOOKS_DATABASE_URL": url}
        refused = await asyncio.to_thread(
            run_cli, "token", "create", "--org", "org_x", "--scope", "webhooks:manage", env=env
        )
        assert refused.returncode == 2
        assert "sellfern-webhooks migrate" in refused.stderr
        migrated = await asyncio.to_thread(run_cli, "migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        assert "revision" in migrated.stdout
        again = await asyncio.to_thread(run_cli, "migrate", env=env)  # idempotent
        assert again.returncode == 0
        created = await asyncio.to_thread(
            run_cli, "token", "create", "--org", "org_x", "--scope", "webhooks:manage", env=env
        )
        assert created.returncode == 0, created.stderr


async def _stamp(url: str, revision: str) -> None:
    """Set the database's revision as if a migration of that id had been applied."""
    engine = database.create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text("UPDATE alembic_version SET version_num = :r"),
                                     {"r": revision})  # fmt: skip
    finally:
        await engine.dispose()


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
async def test_a_rolled_back_version_runs_on_a_database_a_later_one_migrated(
    store: str, sqlite_env: dict[str, str]
) -> None:
    """After a rollback the older version starts on the newer schema (migrations are
    additive) and says so, and its migrate applies nothing, where it refused before; a
    database behind this version, or of another application, is still refused."""
    database_of_run = (
        fresh_postgres("sfw_cli")
        if store == "postgresql"
        else contextlib.nullcontext(sqlite_env["SELLFERN_WEBHOOKS_DATABASE_URL"])
    )
    async with database_of_run as url:
        env = {"SELLFERN_WEBHOOKS_DATABASE_URL": url}
        assert (await asyncio.to_thread(run_cli, "migrate", env=env)).returncode == 0
        await _stamp(url, "9999")  # a revision this version has no file for
        created = await asyncio.to_thread(
            run_cli, "token", "create", "--org", "org_x", "--scope", "webhooks:manage", env=env
        )
        assert created.returncode == 0, created.stderr
        warning = json.loads(created.stderr.splitlines()[-1])
        assert warning["event"] == "the database schema is newer than this version; running on it"
        assert warning["database_revision"] == "9999"
        assert warning["this_version_revision"] == database.head_revision()
        migrated = await asyncio.to_thread(run_cli, "migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        assert "database at revision 9999, newer than this version's" in migrated.stdout
        if store == "postgresql":
            # Behind this version, or not one of its revisions at all (another application's
            # database): refused.
            for revision in ("0001", "ae1027a6acf1"):
                await _stamp(url, revision)
                refused = await asyncio.to_thread(
                    run_cli, "token", "create", "--org", "org_x", "--scope", "webhooks:manage",
                    env=env,
                )  # fmt: skip
                assert refused.returncode == 2, revision
                assert "sellfern-webhooks migrate" in refused.stderr


async def test_publish_is_confirmed_and_lands_in_the_events_queue(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("sellfern.events", "topic", durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "order.created")
        env = {"SELLFERN_WEBHOOKS_AMQP_URL": amqp_url}
        result = await asyncio.to_thread(
            run_cli, "publish", "--type", "order.created", "--org", "org_cli",
            "--data", '{"order_id": "o1"}', env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        event_id = result.stdout.strip()
        message = await queue.get(timeout=10)
        body = json.loads(message.body)
        assert body["id"] == event_id
        assert body["type"] == "order.created"
        assert body["data"] == {"order_id": "o1"}
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    finally:
        await connection.close()


def test_publish_reports_bad_input_and_unreachable_broker() -> None:
    bad = run_cli("publish", "--type", "order.created", "--org", "org_x", "--data", "[1]")
    assert bad.returncode == 2
    assert "JSON object" in bad.stderr
    env = {"SELLFERN_WEBHOOKS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}
    down = run_cli("publish", "--type", "order.created", "--org", "org_x", "--data", "{}", env=env)
    assert down.returncode == 1
    assert "not published" in down.stderr
