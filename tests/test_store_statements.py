"""The worker's batched lookups and leases are one statement each, whatever their batch size.

asyncpg prepares and caches every distinct statement on every pooled connection, for the
connection's life; a statement whose text changed with the number of values (``IN`` with a
placeholder per value) left hundreds of them behind after a spell of retries.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import TEST_SECRET_KEY
from tests.test_store_writes import _park
from worker.store import Store
from worker.store.crypto import SecretBox
from worker.store.records import utcnow
from worker.store.tables import deliveries, one_of

pytestmark = pytest.mark.timeout(60)


def _sql(count: int, dialect: sa.Dialect) -> str:
    ids = [f"evt_{i}" for i in range(count)]
    query = sa.select(deliveries.c.state).where(one_of(deliveries.c.event_id, ids, dialect))
    return str(query.compile(dialect=dialect))


@pytest.mark.unit
def test_one_of_is_one_array_parameter_on_postgresql_and_in_on_sqlite() -> None:
    postgres = create_async_engine("postgresql+asyncpg://").dialect  # no connection made
    assert _sql(1, postgres) == _sql(7, postgres) == _sql(500, postgres)
    assert "= ANY ($1::VARCHAR(100)[])" in _sql(7, postgres)
    assert "IN (" in _sql(7, sqlite.dialect())


async def test_lookups_and_leases_of_any_size_prepare_one_statement_each(
    postgres_url: str, org: str
) -> None:
    engine = create_async_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        store = Store(engine, SecretBox([TEST_SECRET_KEY]))
        slow, event_ids = await _park(store, org, 12)
        for count in range(1, 13):
            wanted = [(event_id, slow) for event_id in event_ids[:count]]
            assert await store.events.succeeded(wanted) == {}
            leased = [e for e, _, _ in await store.parked.lease(slow, count, seconds=60)]
            assert leased == event_ids[:count]
            await store.parked.hold(slow, leased, utcnow() - timedelta(seconds=1))
        async with engine.connect() as connection:
            query = sa.text("SELECT statement FROM pg_prepared_statements")
            prepared = list((await connection.execute(query)).scalars())
    finally:
        await engine.dispose()
    # The succeeded lookup, the lease's update and the hand-back: one statement each.
    assert len([s for s in prepared if "deliveries.event_id = ANY" in s]) == 3, prepared
    assert not [s for s in prepared if "deliveries.event_id IN" in s], prepared
