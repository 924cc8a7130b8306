"""Reads and writes of the service's records. All SQL lives here and in ``tables``."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.store import bulk
from worker.store.crypto import SecretBox
from worker.store.ids import new_id
from worker.store.records import (
    Attempt,
    AttemptRecord,
    DeliveryState,
    NewEvent,
    Page,
    T,
    Webhook,
    utcnow,
)
from worker.store.tables import attempts, deliveries, events, webhook_subscriptions, webhooks
from worker.store.tokens import TokenStore

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
# rotate-keys retries rows that changed under it at most this many times over.
RESEAL_PASSES = 5


def new_signing_secret() -> str:
    """``whsec_`` and base64 of 32 random bytes, as Standard Webhooks libraries expect."""
    import base64  # noqa: PLC0415 - only needed here

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _webhook(row: Mapping[Any, Any], box: SecretBox) -> Webhook:
    """The endpoint with its secrets opened; they are sealed in the row."""
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
    )


def _attempt(row: sa.Row[Any]) -> Attempt:
    return Attempt(**row._asdict())


def _page(items: list[T], limit: int, cursor_of: Any) -> Page[T]:  # noqa: ANN401 - a key function
    has_more = len(items) > limit
    items = items[:limit]
    return Page(items, has_more, cursor_of(items[-1]) if has_more and items else None)


class Store(TokenStore):
    """The service's persistence, over one SQLAlchemy async engine.

    Endpoints' signing secrets are sealed with ``box`` on write and opened on read. A store
    without a box (the token commands need none) refuses to touch endpoints.
    """

    def __init__(self, engine: AsyncEngine, box: SecretBox | None = None) -> None:
        super().__init__(engine)
        self._dialect = engine.dialect.name
        self._secret_box = box

    @property
    def _box(self) -> SecretBox:
        if self._secret_box is None:
            raise RuntimeError("this Store has no SecretBox; endpoints' secrets need one")
        return self._secret_box

    def _webhook(self, row: sa.Row[Any]) -> Webhook:
        return _webhook(row._mapping, self._box)  # noqa: SLF001 - SQLAlchemy's public row mapping

    def _insert_ignoring_duplicates(self, table: sa.Table) -> Any:  # noqa: ANN401 - dialect-specific Insert
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        return insert(table).on_conflict_do_nothing()

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    # --- webhooks -------------------------------------------------------------------------

    async def create_webhook(
        self,
        org_id: str,
        url: str,
        event_types: Sequence[str],
        description: str,
        *,
        enabled: bool,
    ) -> Webhook:
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
        )
        async with self.engine.begin() as connection:
            await connection.execute(
                webhooks.insert().values(
                    id=webhook.id,
                    org_id=org_id,
                    url=url,
                    events=list(webhook.events),
                    enabled=enabled,
                    description=description,
                    secret=self._box.seal(webhook.secret),
                    created_at=now,
                    updated_at=now,
                )
            )
            await self._write_subscriptions(connection, webhook.id, org_id, webhook.events)
        return webhook

    async def _write_subscriptions(
        self, connection: AsyncConnection, webhook_id: str, org_id: str, event_types: Iterable[str]
    ) -> None:
        await connection.execute(
            webhook_subscriptions.delete().where(webhook_subscriptions.c.webhook_id == webhook_id)
        )
        rows = [{"webhook_id": webhook_id, "event_type": t, "org_id": org_id} for t in event_types]
        if rows:
            await connection.execute(webhook_subscriptions.insert(), rows)

    async def list_webhooks(self, org_id: str, limit: int, cursor: str | None) -> Page[Webhook]:
        query = sa.select(webhooks).where(webhooks.c.org_id == org_id)
        if cursor:
            query = query.where(webhooks.c.id < cursor)
        query = query.order_by(webhooks.c.id.desc()).limit(limit + 1)
        async with self.engine.connect() as connection:
            rows = [self._webhook(row) for row in await connection.execute(query)]
        return _page(rows, limit, lambda w: w.id)

    async def get_webhook(self, webhook_id: str, org_id: str | None = None) -> Webhook | None:
        """The endpoint; with ``org_id``, only if it belongs to that organization."""
        query = sa.select(webhooks).where(webhooks.c.id == webhook_id)
        if org_id is not None:
            query = query.where(webhooks.c.org_id == org_id)
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return self._webhook(row) if row else None

    async def get_webhooks(self, webhook_ids: Iterable[str]) -> dict[str, Webhook]:
        """Endpoints by id, in one query; missing ids are absent from the result."""
        if self._dialect == "postgresql":
            # Every delivery reads its endpoint: the hot read, through asyncpg (worker.bulk).
            async with self.engine.connect() as connection:
                raw = await connection.get_raw_connection()
                records = await bulk.read_webhooks(raw.driver_connection, list(set(webhook_ids)))
            found = [_webhook(record, self._box) for record in records]
        else:
            query = sa.select(webhooks).where(webhooks.c.id.in_(set(webhook_ids)))
            async with self.engine.connect() as connection:
                found = [self._webhook(row) for row in await connection.execute(query)]
        return {webhook.id: webhook for webhook in found}

    async def update_webhook(
        self, org_id: str, webhook_id: str, changes: dict[str, Any]
    ) -> Webhook | None:
        """Apply ``changes`` (url, events, enabled, description); None if no such endpoint."""
        values = dict(changes)
        if "events" in values:
            values["events"] = list(values["events"])
        if values.get("enabled") is True:
            # Re-enabling clears why it was disabled and starts a fresh failure run.
            values["disabled_reason"] = None
            values["failing_since"] = None
        values["updated_at"] = utcnow()
        async with self.engine.begin() as connection:
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
                await self._write_subscriptions(connection, webhook_id, org_id, changes["events"])
        return self._webhook(row)

    async def rotate_secret(
        self, org_id: str, webhook_id: str, overlap: timedelta
    ) -> Webhook | None:
        """Give the endpoint a new secret; the old one keeps signing for ``overlap``."""
        now = utcnow()
        async with self.engine.begin() as connection:
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
                        secret=self._box.seal(new_signing_secret()),
                        previous_secret=current.secret,  # still sealed, as read
                        previous_secret_expires_at=now + overlap,
                        updated_at=now,
                    )
                    .returning(*webhooks.c)
                )
            ).one()
        return self._webhook(row)

    async def reseal_secrets(self, batch: int = 500) -> tuple[int, int]:
        """Seal every stored secret again with the box's first key (``rotate-keys``).

        Returns how many endpoints were re-sealed and how many were already current. A row is
        only rewritten if it still holds what was read, so a concurrent rotate-secret is never
        overwritten; such a row is read again and retried.
        """
        resealed = current = 0
        retry: list[str] = []
        cursor = ""
        query = sa.select(webhooks.c.id, webhooks.c.secret, webhooks.c.previous_secret)
        while True:
            async with self.engine.connect() as connection:
                rows = (
                    await connection.execute(
                        query.where(webhooks.c.id > cursor).order_by(webhooks.c.id).limit(batch)
                    )
                ).all()
            if not rows:
                break
            cursor = rows[-1].id
            done, same, missed = await self._reseal_rows(rows)
            resealed, current, retry = resealed + done, current + same, retry + missed
        for _ in range(RESEAL_PASSES):
            if not retry:
                return resealed, current
            async with self.engine.connect() as connection:
                rows = (await connection.execute(query.where(webhooks.c.id.in_(retry)))).all()
            done, same, retry = await self._reseal_rows(rows)
            resealed, current = resealed + done, current + same
        if retry:
            raise RuntimeError("endpoints kept changing under rotate-keys; run it again")
        return resealed, current

    async def _reseal_rows(self, rows: Sequence[Any]) -> tuple[int, int, list[str]]:
        box = self._box
        resealed, current, missed = 0, 0, []
        async with self.engine.begin() as connection:
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

    async def delete_webhook(self, org_id: str, webhook_id: str) -> bool:
        async with self.engine.begin() as connection:
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

    async def disable_webhook(self, webhook_id: str, reason: str) -> bool:
        """Disable an endpoint that is still enabled; True if this call disabled it."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                webhooks.update()
                .where(webhooks.c.id == webhook_id, webhooks.c.enabled.is_(True))
                .values(enabled=False, disabled_reason=reason, updated_at=utcnow())
            )
            return result.rowcount > 0

    async def subscriptions(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], list[str]]:
        """Enabled endpoints per (organization, event type), for many keys in one query."""
        query = (
            sa.select(
                webhook_subscriptions.c.org_id,
                webhook_subscriptions.c.event_type,
                webhook_subscriptions.c.webhook_id,
            )
            .join(webhooks, webhooks.c.id == webhook_subscriptions.c.webhook_id)
            .where(
                sa.tuple_(webhook_subscriptions.c.org_id, webhook_subscriptions.c.event_type).in_(
                    list(keys)
                ),
                webhooks.c.enabled.is_(True),
            )
            .order_by(webhook_subscriptions.c.webhook_id)
        )
        found: dict[tuple[str, str], list[str]] = {key: [] for key in keys}
        async with self.engine.connect() as connection:
            for org_id, event_type, webhook_id in await connection.execute(query):
                found[(org_id, event_type)].append(webhook_id)
        return found

    async def subscribed_webhook_ids(self, org_id: str, event_type: str) -> list[str]:
        """Enabled endpoints of ``org_id`` subscribed to ``event_type``."""
        key = (org_id, event_type)
        return (await self.subscriptions([key]))[key]

    # --- events and deliveries -------------------------------------------------------------

    async def store_event_and_deliveries(
        self, event: dict[str, Any], occurred_at: datetime, webhook_ids: Sequence[str]
    ) -> None:
        """Keep the event and open one delivery per endpoint; repeating this is harmless."""
        await self.store_events_and_deliveries([NewEvent(event, occurred_at, tuple(webhook_ids))])

    async def store_events_and_deliveries(self, batch: Sequence[NewEvent]) -> None:
        """Keep a batch of events and their deliveries in one transaction (idempotent)."""
        await self.write_batch(batch)

    async def write_batch(self, batch: Sequence[NewEvent | AttemptRecord]) -> None:
        """Keep what the pipeline produced — events with their deliveries, and attempts — in
        one transaction: the hot path pays one commit per batch, whatever it holds."""
        if not batch:
            return
        new_events = [item for item in batch if isinstance(item, NewEvent)]
        records = [item for item in batch if isinstance(item, AttemptRecord)]
        if self._dialect == "postgresql":
            async with self.engine.connect() as connection:
                raw = await connection.get_raw_connection()
                await bulk.write_batch(raw.driver_connection, new_events, records)
            return
        async with self.engine.begin() as connection:
            # Events first: an attempt of the same batch then advances the delivery row the
            # event opened, and never the other way round.
            if new_events:
                await self._insert_events(connection, new_events)
            if records:
                await self._insert_attempts(connection, records)

    async def _insert_events(self, connection: AsyncConnection, batch: list[NewEvent]) -> None:
        now = utcnow()
        event_rows = {
            item.event["id"]: {
                "id": item.event["id"],
                "org_id": item.event["organization_id"],
                "type": item.event["type"],
                "occurred_at": item.occurred_at,
                "payload": item.event,
                "received_at": now,
            }
            for item in batch
        }
        delivery_rows = {
            (item.event["id"], webhook_id): {
                "event_id": item.event["id"],
                "webhook_id": webhook_id,
                "state": "parked" if webhook_id in item.parked else "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
                "updated_at": now,
            }
            for item in batch
            for webhook_id in item.webhook_ids
        }
        await connection.execute(
            self._insert_ignoring_duplicates(events), list(event_rows.values())
        )
        if delivery_rows:
            await connection.execute(
                self._insert_ignoring_duplicates(deliveries), list(delivery_rows.values())
            )

    async def parked_endpoints(self) -> dict[str, int]:
        """How many deliveries are parked in the database per endpoint, by any worker."""
        query = (
            sa.select(deliveries.c.webhook_id, sa.func.count().label("parked"))
            .where(deliveries.c.state == "parked")
            .group_by(deliveries.c.webhook_id)
        )
        async with self.engine.connect() as connection:
            return {row.webhook_id: row.parked for row in await connection.execute(query)}

    async def release_parked(
        self,
        webhook_id: str,
        limit: int,
        publish: Callable[[list[tuple[str, dict[str, Any]]]], Awaitable[None]],
    ) -> int:
        """Hand the oldest ``limit`` parked deliveries of an endpoint to ``publish`` (event id
        and event), then mark them pending; return how many.

        The rows stay locked and parked until ``publish`` returns, so a crash in between
        releases them again later (a duplicate, never a loss), and two workers never release
        the same row (``SKIP LOCKED`` on PostgreSQL; SQLite has one writer at a time anyway).
        """
        query = (
            sa.select(deliveries.c.event_id, events.c.payload)
            .join(events, events.c.id == deliveries.c.event_id)
            .where(deliveries.c.state == "parked", deliveries.c.webhook_id == webhook_id)
            .order_by(deliveries.c.created_at, deliveries.c.event_id)
            .limit(limit)
            .with_for_update(of=deliveries, skip_locked=True)
        )
        async with self.engine.begin() as connection:
            found = [
                (event_id, dict(payload)) for event_id, payload in await connection.execute(query)
            ]
            if not found:
                return 0
            await publish(found)
            await connection.execute(
                deliveries.update()
                .where(
                    deliveries.c.webhook_id == webhook_id,
                    deliveries.c.event_id.in_([event_id for event_id, _ in found]),
                    deliveries.c.state == "parked",
                )
                .values(state="pending", updated_at=utcnow())
            )
        return len(found)

    async def get_event(self, event_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as connection:
            payload = (
                await connection.execute(sa.select(events.c.payload).where(events.c.id == event_id))
            ).scalar()
        return dict(payload) if payload is not None else None

    async def delivery_state(self, event_id: str, webhook_id: str) -> DeliveryState | None:
        async with self.engine.connect() as connection:
            return (
                await connection.execute(
                    sa.select(deliveries.c.state).where(
                        deliveries.c.event_id == event_id, deliveries.c.webhook_id == webhook_id
                    )
                )
            ).scalar()

    # --- attempts -------------------------------------------------------------------------

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """Write a batch of attempts and their effects in one transaction."""
        await self.write_batch(records)

    async def _insert_attempts(
        self, connection: AsyncConnection, records: list[AttemptRecord]
    ) -> None:
        await connection.execute(attempts.insert(), [_attempt_values(r.attempt) for r in records])
        # One upsert for the whole batch (executemany), not two statements per attempt.
        await connection.execute(
            self._delivery_upsert(),
            [
                {
                    "event_id": r.attempt.event_id,
                    "webhook_id": r.attempt.webhook_id,
                    "state": r.delivery_state,
                    "attempts": r.attempt.attempt,
                    "next_attempt_at": r.next_attempt_at,
                    "created_at": r.attempt.created_at,
                    "updated_at": r.attempt.created_at,
                }
                for r in records
            ],
        )
        await self._track_failure_runs(connection, records)

    def _delivery_upsert(self) -> Any:  # noqa: ANN401 - dialect-specific Insert
        """Insert or advance a delivery. A succeeded delivery stays succeeded: a late duplicate
        of an earlier attempt must not reopen it."""
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        statement = insert(deliveries)
        larger = sa.func.greatest if self._dialect == "postgresql" else sa.func.max
        return statement.on_conflict_do_update(
            index_elements=[deliveries.c.event_id, deliveries.c.webhook_id],
            set_={
                "state": sa.case(
                    (deliveries.c.state == "succeeded", deliveries.c.state),
                    else_=statement.excluded.state,
                ),
                "attempts": larger(deliveries.c.attempts, statement.excluded.attempts),
                "next_attempt_at": statement.excluded.next_attempt_at,
                "updated_at": statement.excluded.updated_at,
            },
        )

    async def _track_failure_runs(
        self, connection: AsyncConnection, records: Sequence[AttemptRecord]
    ) -> None:
        succeeded, failed = bulk.failure_runs(records)
        if succeeded:
            await connection.execute(
                webhooks.update()
                .where(webhooks.c.id.in_(succeeded), webhooks.c.failing_since.is_not(None))
                .values(failing_since=None)
            )
        for webhook_id, since in failed.items():
            await connection.execute(
                webhooks.update()
                .where(webhooks.c.id == webhook_id, webhooks.c.failing_since.is_(None))
                .values(failing_since=since)
            )

    async def list_attempts(
        self,
        webhook_id: str,
        limit: int,
        cursor: str | None,
        success: bool | None = None,
    ) -> Page[Attempt]:
        """Attempts to one endpoint, newest first."""
        query = sa.select(attempts).where(attempts.c.webhook_id == webhook_id)
        if cursor:
            query = query.where(attempts.c.id < cursor)
        if success is not None:
            query = query.where(attempts.c.success.is_(success))
        query = query.order_by(attempts.c.id.desc()).limit(limit + 1)
        async with self.engine.connect() as connection:
            rows = [_attempt(row) for row in await connection.execute(query)]
        return _page(rows, limit, lambda a: a.id)

    async def get_attempt(self, webhook_id: str, attempt_id: str) -> Attempt | None:
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    sa.select(attempts).where(
                        attempts.c.id == attempt_id, attempts.c.webhook_id == webhook_id
                    )
                )
            ).first()
        return _attempt(row) if row else None

    async def last_attempt_number(self, event_id: str, webhook_id: str) -> int:
        async with self.engine.connect() as connection:
            value = (
                await connection.execute(
                    sa.select(sa.func.max(attempts.c.attempt)).where(
                        attempts.c.event_id == event_id, attempts.c.webhook_id == webhook_id
                    )
                )
            ).scalar()
        return int(value or 0)

    async def prune(self, older_than: datetime) -> tuple[int, int]:
        """Delete events and attempts older than ``older_than``; return how many of each."""
        async with self.engine.begin() as connection:
            pruned_attempts = await connection.execute(
                attempts.delete().where(attempts.c.created_at < older_than)
            )
            old_events = sa.select(events.c.id).where(events.c.received_at < older_than)
            await connection.execute(
                deliveries.delete().where(deliveries.c.event_id.in_(old_events))
            )
            pruned_events = await connection.execute(
                events.delete().where(events.c.received_at < older_than)
            )
        return pruned_events.rowcount, pruned_attempts.rowcount


def _attempt_values(attempt: Attempt) -> dict[str, Any]:
    return {field: getattr(attempt, field) for field in Attempt.__dataclass_fields__}
