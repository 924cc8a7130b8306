"""Webhook endpoints and the event types they subscribe to.

Endpoints' signing secrets are sealed with a :class:`~worker.store.crypto.SecretBox` on
write and opened on read, so this repository needs one; a store built without a box (the
token commands need none) refuses every endpoint call with a clear error instead.
"""

from __future__ import annotations

import base64
import builtins
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.store.crypto import SecretBox
from worker.store.ids import new_id
from worker.store.records import Page, Webhook, page_of, utcnow
from worker.store.tables import webhook_subscriptions, webhooks

# The condition of the partial index ix_webhooks_policies, as the queries that use it write it.
POLICY_FILTER = sa.or_(webhooks.c.rate_limit.is_not(None), webhooks.c.ordered.is_(True))

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret

# Every delivery reads its endpoint, so on PostgreSQL this read skips SQLAlchemy and goes to
# asyncpg directly (as the pipeline's batch write does, see worker.store.pipeline_pg).
READ_WEBHOOKS = """
SELECT id, org_id, url, events, enabled, description, secret, previous_secret,
       previous_secret_expires_at, created_at, updated_at, disabled_reason, failing_since,
       headers, rate_limit, timeout_seconds, ordered
FROM webhooks WHERE id = ANY($1::varchar[])
"""


def new_signing_secret() -> str:
    """``whsec_`` and base64 of 32 random bytes, as Standard Webhooks libraries expect."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def require_box(box: SecretBox | None) -> SecretBox:
    """``box``, or the error a store built without one gives for endpoints' secrets."""
    if box is None:
        raise RuntimeError("this Store has no SecretBox; endpoints' secrets need one")
    return box


def uses_asyncpg(engine: AsyncEngine) -> bool:
    """Whether the hot statements may go to asyncpg directly under this engine."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"


def webhook_from_row(row: Mapping[Any, Any], box: SecretBox) -> Webhook:
    """The endpoint with its secrets opened; they are sealed in the row.

    ``row`` is a SQLAlchemy row mapping or an asyncpg record: both are read by column name.
    """
    return Webhook(
        id=row["id"],
        org_id=row["org_id"],
        url=row["url"],
        events=tuple(row["events"]),
        enabled=row["enabled"],
        description=row["description"],
        secret=box.open(row["secret"]),
        previous_secret=box.open(row["previous_secret"]) if row["previous_secret"] else None,
        previous_secret_expires_at=row["previous_secret_expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        headers=dict(row["headers"] or {}),
        rate_limit=row["rate_limit"],
        timeout_seconds=row["timeout_seconds"],
        ordered=row["ordered"],
    )


class EndpointRepository:
    """The ``webhooks`` and ``webhook_subscriptions`` tables."""

    def __init__(self, engine: AsyncEngine, box: SecretBox | None) -> None:
        self._engine = engine
        self._secret_box = box
        self._asyncpg = uses_asyncpg(engine)

    @property
    def _box(self) -> SecretBox:
        return require_box(self._secret_box)

    def _webhook(self, row: sa.Row[Any]) -> Webhook:
        return webhook_from_row(row._mapping, self._box)  # noqa: SLF001 - SQLAlchemy's public row mapping

    async def create(
        self,
        org_id: str,
        url: str,
        event_types: Sequence[str],
        description: str,
        *,
        enabled: bool,
        headers: Mapping[str, str] | None = None,
        rate_limit: int | None = None,
        timeout_seconds: int | None = None,
        ordered: bool = False,
    ) -> Webhook:
        """Register an endpoint with a new signing secret, subscribed to ``event_types``."""
        box = self._box  # before anything is written: a store without a box writes nothing
        now = utcnow()
        webhook = Webhook(
            id=new_id("wh"),
            org_id=org_id,
            url=url,
            events=tuple(event_types),
            enabled=enabled,
            description=description,
            secret=new_signing_secret(),
            previous_secret=None,
            previous_secret_expires_at=None,
            created_at=now,
            updated_at=now,
            disabled_reason=None,
            failing_since=None,
            headers=dict(headers or {}),
            rate_limit=rate_limit,
            timeout_seconds=timeout_seconds,
            ordered=ordered,
        )
        async with self._engine.begin() as connection:
            await connection.execute(
                webhooks.insert().values(
                    id=webhook.id,
                    org_id=org_id,
                    url=url,
                    events=builtins.list(webhook.events),
                    enabled=enabled,
                    description=description,
                    secret=box.seal(webhook.secret),
                    created_at=now,
                    updated_at=now,
                    headers=dict(webhook.headers),
                    rate_limit=rate_limit,
                    timeout_seconds=timeout_seconds,
                    ordered=ordered,
                )
            )
            await _write_subscriptions(connection, webhook.id, org_id, webhook.events)
        return webhook

    async def list(self, org_id: str, limit: int, cursor: str | None) -> Page[Webhook]:
        """An organization's endpoints, newest first, ``limit`` per page after ``cursor``."""
        query = sa.select(webhooks).where(webhooks.c.org_id == org_id)
        if cursor:
            query = query.where(webhooks.c.id < cursor)
        query = query.order_by(webhooks.c.id.desc()).limit(limit + 1)
        async with self._engine.connect() as connection:
            rows = [self._webhook(row) for row in await connection.execute(query)]
        return page_of(rows, limit, lambda w: w.id)

    async def get(self, webhook_id: str, org_id: str | None = None) -> Webhook | None:
        """The endpoint; with ``org_id``, only if it belongs to that organization."""
        query = sa.select(webhooks).where(webhooks.c.id == webhook_id)
        if org_id is not None:
            query = query.where(webhooks.c.org_id == org_id)
        async with self._engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return self._webhook(row) if row else None

    async def get_many(self, webhook_ids: Iterable[str]) -> dict[str, Webhook]:
        """Endpoints by id, in one query; missing ids are absent from the result."""
        box = self._box
        wanted = builtins.list(set(webhook_ids))
        async with self._engine.connect() as connection:
            if self._asyncpg:
                raw = await connection.get_raw_connection()
                driver: Any = raw.driver_connection  # an asyncpg.Connection; asyncpg has no hints
                records = await driver.fetch(READ_WEBHOOKS, wanted)
                found = [webhook_from_row(record, box) for record in records]
            else:
                query = sa.select(webhooks).where(webhooks.c.id.in_(wanted))
                found = [self._webhook(row) for row in await connection.execute(query)]
        return {webhook.id: webhook for webhook in found}

    async def update(self, org_id: str, webhook_id: str, changes: dict[str, Any]) -> Webhook | None:
        """Apply ``changes`` (url, events, enabled, description, headers, rate_limit,
        timeout_seconds, ordered); None if no such endpoint."""
        box = self._box
        values = dict(changes)
        if "events" in values:
            values["events"] = builtins.list(values["events"])
        if "headers" in values:
            values["headers"] = dict(values["headers"] or {})  # the whole set; None clears it
        if values.get("enabled") is True:
            # Re-enabling clears why it was disabled and starts a fresh failure run.
            values["disabled_reason"] = None
            values["failing_since"] = None
        values["updated_at"] = utcnow()
        async with self._engine.begin() as connection:
            result = await connection.execute(
                webhooks.update()
                .where(webhooks.c.id == webhook_id, webhooks.c.org_id == org_id)
                .values(**values)
                .returning(*webhooks.c)
            )
            row = result.first()
            if row is None:
                return None
            if "events" in changes:
                await _write_subscriptions(connection, webhook_id, org_id, changes["events"])
        return webhook_from_row(row._mapping, box)  # noqa: SLF001 - SQLAlchemy's public row mapping

    async def rotate_secret(
        self, org_id: str, webhook_id: str, overlap: timedelta
    ) -> Webhook | None:
        """Give the endpoint a new secret; the old one keeps signing for ``overlap``."""
        box = self._box
        now = utcnow()
        async with self._engine.begin() as connection:
            current = (
                await connection.execute(
                    sa.select(webhooks.c.secret).where(
                        webhooks.c.id == webhook_id, webhooks.c.org_id == org_id
                    )
                )
            ).first()
            if current is None:
                return None
            row = (
                await connection.execute(
                    webhooks.update()
                    .where(webhooks.c.id == webhook_id)
                    .values(
                        secret=box.seal(new_signing_secret()),
                        previous_secret=current.secret,  # still sealed, as read
                        previous_secret_expires_at=now + overlap,
                        updated_at=now,
                    )
                    .returning(*webhooks.c)
                )
            ).one()
        return webhook_from_row(row._mapping, box)  # noqa: SLF001 - SQLAlchemy's public row mapping

    async def delete(self, org_id: str, webhook_id: str) -> bool:
        """Delete an organization's endpoint and its subscriptions; True if it existed."""
        async with self._engine.begin() as connection:
            await connection.execute(
                webhook_subscriptions.delete().where(
                    webhook_subscriptions.c.webhook_id == webhook_id,
                    webhook_subscriptions.c.org_id == org_id,
                )
            )
            result = await connection.execute(
                webhooks.delete().where(webhooks.c.id == webhook_id, webhooks.c.org_id == org_id)
            )
            return result.rowcount > 0

    async def disable(self, webhook_id: str, reason: str) -> bool:
        """Disable an endpoint that is still enabled; True if this call disabled it."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                webhooks.update()
                .where(webhooks.c.id == webhook_id, webhooks.c.enabled.is_(True))
                .values(enabled=False, disabled_reason=reason, updated_at=utcnow())
            )
            return result.rowcount > 0

    async def subscriptions(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], builtins.list[str]]:
        """Enabled endpoints per (organization, event type), for many keys in one query."""
        found: dict[tuple[str, str], builtins.list[str]] = {key: [] for key in keys}
        if not found:
            return found
        query = (
            sa.select(
                webhook_subscriptions.c.org_id,
                webhook_subscriptions.c.event_type,
                webhook_subscriptions.c.webhook_id,
            )
            .join(webhooks, webhooks.c.id == webhook_subscriptions.c.webhook_id)
            .where(
                sa.tuple_(webhook_subscriptions.c.org_id, webhook_subscriptions.c.event_type).in_(
                    builtins.list(keys)
                ),
                webhooks.c.enabled.is_(True),
            )
            .order_by(webhook_subscriptions.c.webhook_id)
        )
        async with self._engine.connect() as connection:
            for org_id, event_type, webhook_id in await connection.execute(query):
                found[(org_id, event_type)].append(webhook_id)
        return found

    async def subscribed_ids(self, org_id: str, event_type: str) -> builtins.list[str]:
        """Enabled endpoints of ``org_id`` subscribed to ``event_type``."""
        key = (org_id, event_type)
        return (await self.subscriptions([key]))[key]

    async def policies(self) -> builtins.list[tuple[str, int | None, bool]]:
        """(id, rate_limit, ordered) of every enabled endpoint with a limit or ordering: what
        each worker enforces itself (:mod:`worker.pipeline.policies`). Found through the
        partial index ``ix_webhooks_policies``, so endpoints without either cost nothing."""
        query = sa.select(webhooks.c.id, webhooks.c.rate_limit, webhooks.c.ordered).where(
            webhooks.c.enabled.is_(True), POLICY_FILTER
        )
        async with self._engine.connect() as connection:
            return [
                (row.id, row.rate_limit, bool(row.ordered))
                for row in await connection.execute(query)
            ]


async def _write_subscriptions(
    connection: AsyncConnection, webhook_id: str, org_id: str, event_types: Iterable[str]
) -> None:
    """Replace the endpoint's subscription rows, in the caller's transaction."""
    await connection.execute(
        webhook_subscriptions.delete().where(webhook_subscriptions.c.webhook_id == webhook_id)
    )
    rows = [{"webhook_id": webhook_id, "event_type": t, "org_id": org_id} for t in event_types]
    if rows:
        await connection.execute(webhook_subscriptions.insert(), rows)
