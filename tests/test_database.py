"""The engine's pool hands out open connections without a round trip before each use."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import PG_ADMIN_DSN, eventually
from worker.store import database
from worker.store.pipeline_pg import AsyncpgPipelineWrites
from worker.store.records import NewEvent

pytestmark = pytest.mark.timeout(60)


async def _backend(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


async def test_a_pooled_connection_whose_server_end_was_terminated_is_replaced(
    postgres_url: str,
) -> None:
    engine = database.create_engine(postgres_url)
    try:
        async with engine.connect() as connection:
            driver: Any = (await connection.get_raw_connection()).driver_connection
            idle = await driver.fetchval("SELECT pg_backend_pid()")
        assert idle == await _backend(engine), "the pool should hand the same connection back"
        await _terminate(idle)
        # The server closed it; once the event loop has read that (asyncpg then marks it
        # closed, with no round trip), the next checkout does not hand it out. Not pinged:
        # it was used a moment ago.

        async def closed() -> bool:
            return bool(driver.is_closed())

        await eventually(closed, timeout=5, what="asyncpg marking the terminated connection")
        replaced = await _backend(engine)
        assert replaced != idle
    finally:
        await engine.dispose()


async def test_only_a_connection_idle_past_the_limit_is_pinged_and_then_left_as_it_was(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = database.create_engine(postgres_url)
    pings: list[Any] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:  # noqa: ANN401 - a DB-API connection
        pings.append(dbapi_connection)
        return ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    try:
        await _backend(engine)  # a new connection: not pinged
        await _backend(engine)  # used a moment ago: not pinged
        assert pings == []
        monkeypatch.setattr(database, "IDLE_PING_SECONDS", 0.0)  # as if idle for long
        await _backend(engine)
        assert len(pings) == 1
        # The ping leaves no transaction open: the asyncpg batch write starts its own.
        event = {"id": "evt_pinged", "type": "order.created", "organization_id": "org_p",
                 "occurred_at": "2026-01-01T00:00:00Z", "data": {}}  # fmt: skip
        writes = AsyncpgPipelineWrites(engine)
        await writes.write_batch([NewEvent(event, datetime(2026, 1, 1, tzinfo=UTC), ())])
        assert len(pings) == 2
        async with engine.connect() as connection:
            stored = await connection.execute(
                sa.text("SELECT count(*) FROM events WHERE id = 'evt_pinged'")
            )
            assert stored.scalar_one() == 1
    finally:
        await engine.dispose()


async def _terminate(backend: int) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", backend)
    finally:
        await admin.close()
