"""Database engine and migrations, the same for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = structlog.get_logger("sellfern_webhooks.database")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class NotMigratedError(Exception):
    """The database schema is behind the code; the operator should run ``migrate``."""


def create_engine(url: str) -> AsyncEngine:
    """An engine with the pragmas SQLite needs to serve an API and a worker at once."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:  # noqa: ANN401 - DB-API connection
            cursor = dbapi_connection.cursor()
            # WAL lets readers run beside the one writer; NORMAL is durable across process
            # crashes (only a power loss can drop the newest commits), the usual WAL pairing.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    engine = create_async_engine(url, pool_size=10, max_overflow=10)
    _check_before_use(engine)
    return engine


# A pooled connection idle this long is pinged before it is used again. One pinged at every
# checkout (SQLAlchemy's pool_pre_ping) cost a round trip per query, batch and lookup: under
# load, about a twentieth of the worker's CPU per delivery.
IDLE_PING_SECONDS = 5.0
_RETURNED = "returned_at"


def _check_before_use(engine: AsyncEngine) -> None:
    """Hand out only connections that are open: one whose server end is gone is replaced.

    asyncpg marks a connection closed as soon as the server ends it (a restart, a terminated
    backend), so that costs nothing; a connection idle past ``IDLE_PING_SECONDS`` is pinged
    too, for what only a round trip finds (a connection dropped silently on the way).
    Raising ``DisconnectionError`` here makes the pool discard it and take another.
    """

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _opened(_dbapi_connection: Any, record: Any) -> None:  # noqa: ANN401 - DB-API connection
        record.info[_RETURNED] = time.monotonic()

    @sa.event.listens_for(engine.sync_engine, "checkin")
    def _returned(_dbapi_connection: Any, record: Any) -> None:  # noqa: ANN401 - DB-API connection
        record.info[_RETURNED] = time.monotonic()

    @sa.event.listens_for(engine.sync_engine, "checkout")
    def _alive(dbapi_connection: Any, record: Any, _proxy: object) -> None:  # noqa: ANN401 - DB-API connection
        is_closed = getattr(dbapi_connection.driver_connection, "is_closed", None)
        if is_closed is not None and is_closed():
            raise sa.exc.DisconnectionError("the server closed the connection")
        if time.monotonic() - record.info.get(_RETURNED, 0.0) < IDLE_PING_SECONDS:
            return
        try:
            # The dialect's own ping, as pool_pre_ping sends it: it leaves no transaction open
            # (a cursor's statement would, and asyncpg's transaction() then refuses to start).
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"the idle connection did not answer: {exc}") from exc


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    def _read(connection: sa.Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(_read)


def is_later_revision(revision: str | None, head: str | None) -> bool:
    """Whether a later version of this service migrated the database (at ``revision``) past
    this one's ``head``: one it then runs on after a rollback (migrations are additive).
    Revisions are numbered in sequence (``0005``), so a database of some other application is
    still refused."""
    if revision is None or head is None or not (revision.isdigit() and head.isdigit()):
        return False
    return int(revision) > int(head)


async def migrate(engine: AsyncEngine) -> tuple[str | None, str | None]:
    """Apply every pending migration; return the revisions before and after.

    A database a later version migrated is left as it is (see :func:`is_later_revision`).
    """
    before, head = await current_revision(engine), head_revision()
    if is_later_revision(before, head):
        return before, before

    def _upgrade(connection: sa.Connection) -> None:
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)
    return before, head


async def ensure_schema(engine: AsyncEngine, *, auto_migrate: bool) -> None:
    """Make sure the schema is current before serving.

    SQLite is the single-machine store, so it is migrated in place. On PostgreSQL several
    replicas may start at once, so migrations are an explicit step (a Job in Kubernetes).
    """
    current, head = await current_revision(engine), head_revision()
    if current == head:
        return
    if is_later_revision(current, head):
        log.warning(
            "the database schema is newer than this version; running on it",
            database_revision=current,
            this_version_revision=head,
        )
        return
    if auto_migrate:
        await migrate(engine)
        return
    raise NotMigratedError(
        "the database schema is not current: run `sellfern-webhooks migrate` first"
    )
