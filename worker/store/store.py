"""The store: the service's repositories over one SQLAlchemy async engine.

:class:`Store` only builds and holds them; every query lives in the repository of its record
(and the SQL of the tables in :mod:`worker.store.tables`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.attempts import AttemptRepository
from worker.store.crypto import SecretBox
from worker.store.endpoints import EndpointRepository, uses_asyncpg
from worker.store.events import EventRepository
from worker.store.ordered import OrderedBacklog
from worker.store.parked import ParkedDeliveries
from worker.store.pipeline_pg import AsyncpgPipelineWrites
from worker.store.pipeline_writes import CorePipelineWrites, PipelineWrites
from worker.store.recoveries import RecoveryRepository
from worker.store.reseal import SecretResealer
from worker.store.stats import StatsRepository
from worker.store.tokens import TokenRepository


class Store:
    """The repositories, built once per engine.

    Endpoints' signing secrets are sealed with ``box`` on write and opened on read. A store
    without a box (the token commands need none) still serves tokens, and refuses to open
    endpoints or re-seal their secrets.
    """

    def __init__(self, engine: AsyncEngine, box: SecretBox | None = None) -> None:
        self.engine = engine
        self.endpoints = EndpointRepository(engine, box)
        self.events = EventRepository(engine)
        self.attempts = AttemptRepository(engine)
        self.parked = ParkedDeliveries(engine)
        self.ordered = OrderedBacklog(engine)
        self.recoveries = RecoveryRepository(engine)
        self.stats = StatsRepository(engine)
        # The hot write goes to asyncpg directly where it can (see worker.store.pipeline_pg).
        self.pipeline: PipelineWrites = (
            AsyncpgPipelineWrites(engine) if uses_asyncpg(engine) else CorePipelineWrites(engine)
        )
        self.tokens = TokenRepository(engine)
        self.secrets = SecretResealer(engine, box)

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        async with self.engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))
