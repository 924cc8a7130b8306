"""An endpoint's health: attempts, durations and backlog, computed in the database.

The window's attempts are found through ``ix_attempts_webhook_id_created_at`` and the
backlog through ``ix_deliveries_webhook_id_state``. Percentiles are continuous (linear
interpolation between the two nearest ranks, as ``percentile_cont``): PostgreSQL computes
them with ``percentile_cont``; SQLite has no such aggregate, so each percentile is the
interpolation of the one or two durations at ranks ``floor``/``ceil`` of ``q * (n - 1)``,
each read with ``ORDER BY duration_ms LIMIT 1 OFFSET k`` — exact, and the same figures.
"""

from __future__ import annotations

import math
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.store.records import EndpointStats
from worker.store.tables import UTCDateTime, attempts, deliveries

PERCENTILES = (0.5, 0.95)


class StatsRepository:
    """Read-only figures over ``attempts`` and ``deliveries`` for one endpoint."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._postgresql = engine.dialect.name == "postgresql"

    async def endpoint(self, webhook_id: str, since: datetime, until: datetime) -> EndpointStats:
        """The endpoint's attempts in ``[since, until]``, its latest success and failure (in
        all retained attempts) and its deliveries not yet settled (``pending``, ``parked``)."""
        in_window = sa.and_(
            attempts.c.webhook_id == webhook_id,
            attempts.c.created_at >= since,
            attempts.c.created_at <= until,
        )
        counts = sa.select(
            sa.func.count().filter(attempts.c.success.is_(True)).label("succeeded"),
            sa.func.count().filter(attempts.c.success.is_(False)).label("failed"),
        ).where(in_window)
        last = sa.select(
            *(
                sa.type_coerce(
                    sa.select(sa.func.max(attempts.c.created_at))
                    .where(attempts.c.webhook_id == webhook_id, attempts.c.success.is_(ok))
                    .scalar_subquery(),
                    UTCDateTime,
                ).label(name)
                for ok, name in ((True, "last_success_at"), (False, "last_failure_at"))
            )
        )
        backlog = (
            sa.select(deliveries.c.state, sa.func.count().label("n"))
            .where(
                deliveries.c.webhook_id == webhook_id,
                deliveries.c.state.in_(("pending", "parked")),
            )
            .group_by(deliveries.c.state)
        )
        async with self._engine.connect() as connection:
            count_row = (await connection.execute(counts)).one()
            last_row = (await connection.execute(last)).one()
            states = {row.state: int(row.n) for row in await connection.execute(backlog)}
            total = int(count_row.succeeded) + int(count_row.failed)
            p50, p95 = await self._percentiles(connection, in_window, total)
        return EndpointStats(
            since=since,
            until=until,
            succeeded=int(count_row.succeeded),
            failed=int(count_row.failed),
            p50_ms=p50,
            p95_ms=p95,
            last_success_at=last_row.last_success_at,
            last_failure_at=last_row.last_failure_at,
            pending=states.get("pending", 0),
            parked=states.get("parked", 0),
        )

    async def _percentiles(
        self, connection: AsyncConnection, in_window: sa.ColumnElement[bool], n: int
    ) -> tuple[float | None, float | None]:
        if n == 0:
            return None, None
        if self._postgresql:
            row = (
                await connection.execute(
                    sa.select(
                        *(
                            sa.func.percentile_cont(q).within_group(attempts.c.duration_ms)
                            for q in PERCENTILES
                        )
                    ).where(in_window)
                )
            ).one()
            return float(row[0]), float(row[1])
        found: list[float] = []
        for q in PERCENTILES:
            position = q * (n - 1)
            low, high = math.floor(position), math.ceil(position)
            below = await _duration_at(connection, in_window, low)
            above = below if high == low else await _duration_at(connection, in_window, high)
            found.append(below + (above - below) * (position - low))
        return found[0], found[1]


async def _duration_at(
    connection: AsyncConnection, in_window: sa.ColumnElement[bool], rank: int
) -> float:
    query = (
        sa.select(attempts.c.duration_ms)
        .where(in_window)
        .order_by(attempts.c.duration_ms)
        .limit(1)
        .offset(rank)
    )
    return float((await connection.execute(query)).scalar_one())
