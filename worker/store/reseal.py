"""``rotate-keys``: seal every stored signing secret again with the box's first key.

After a new key is put first in ``SECRET_KEYS``, this rewrites what the old keys sealed, so
that the old keys can then be dropped (see :mod:`worker.store.crypto`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.store.crypto import SecretBox
from worker.store.endpoints import require_box
from worker.store.tables import webhooks

# Rows that changed under the rewrite are retried at most this many times over.
RESEAL_PASSES = 5


class SecretResealer:
    """Re-seals the ``webhooks`` table's secrets; refuses to run without a box."""

    def __init__(self, engine: AsyncEngine, box: SecretBox | None) -> None:
        self._engine = engine
        self._secret_box = box

    async def reseal(self, batch: int = 500) -> tuple[int, int]:
        """Seal every stored secret again with the box's first key.

        Returns how many endpoints were re-sealed and how many were already current. A row is
        only rewritten if it still holds what was read, so a concurrent rotate-secret is never
        overwritten; such a row is read again and retried.
        """
        box = require_box(self._secret_box)
        resealed = current = 0
        retry: list[str] = []
        cursor = ""
        query = sa.select(webhooks.c.id, webhooks.c.secret, webhooks.c.previous_secret)
        while True:
            async with self._engine.connect() as connection:
                rows = (
                    await connection.execute(
                        query.where(webhooks.c.id > cursor).order_by(webhooks.c.id).limit(batch)
                    )
                ).all()
            if not rows:
                break
            cursor = rows[-1].id
            done, same, missed = await self._reseal_rows(box, rows)
            resealed, current, retry = resealed + done, current + same, retry + missed
        for _ in range(RESEAL_PASSES):
            if not retry:
                return resealed, current
            async with self._engine.connect() as connection:
                rows = (await connection.execute(query.where(webhooks.c.id.in_(retry)))).all()
            done, same, retry = await self._reseal_rows(box, rows)
            resealed, current = resealed + done, current + same
        if retry:
            raise RuntimeError("endpoints kept changing under rotate-keys; run it again")
        return resealed, current

    async def _reseal_rows(self, box: SecretBox, rows: Sequence[Any]) -> tuple[int, int, list[str]]:
        """Re-seal ``rows`` in one transaction; return re-sealed, current, and missed ids."""
        resealed, current, missed = 0, 0, []
        async with self._engine.begin() as connection:
            for row in rows:
                stale = {
                    column: box.reseal(value)
                    for column, value in (
                        ("secret", row.secret),
                        ("previous_secret", row.previous_secret),
                    )
                    if value and box.needs_rotation(value)
                }
                if not stale:
                    current += 1
                    continue
                previous = webhooks.c.previous_secret
                result = await connection.execute(
                    webhooks.update()
                    .where(
                        webhooks.c.id == row.id,
                        webhooks.c.secret == row.secret,
                        previous.is_(None)
                        if row.previous_secret is None
                        else previous == row.previous_secret,
                    )
                    .values(**stale)
                )
                if result.rowcount:
                    resealed += 1
                else:
                    missed.append(row.id)
        return resealed, current, missed
