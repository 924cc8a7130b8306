"""Reads and writes of the service's records. All SQL lives here and in ``tables``."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker.ids import new_id
from worker.tables import api_tokens, attempts, deliveries, events, webhook_subscriptions, webhooks

T = TypeVar("T")

TOKEN_PREFIX = "sfw_"  # noqa: S105 - a prefix, not a secret
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
# Writing last_used_at on every request would make every read a write; a minute is precise
# enough for "is this token still in use?".
LAST_USED_RESOLUTION = timedelta(minutes=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_signing_secret() -> str:
    """``whsec_`` and base64 of 32 random bytes, as Standard Webhooks libraries expect."""
    import base64  # noqa: PLC0415 - only needed here

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True, slots=True)
class Token:
    id: str
    org_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    org_id: str
    url: str
    events: tuple[str, ...]
    enabled: bool
    description: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    disabled_reason: str | None
    failing_since: datetime | None

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets that sign a payload now: the current one, and during a rotation the old."""
        keys = [self.secret]
        if (
            self.previous_secret
            and self.previous_secret_expires_at
            and self.previous_secret_expires_at > now
        ):
            keys.append(self.previous_secret)
        return keys


@dataclass(frozen=True, slots=True)
class Attempt:
    id: str
    webhook_id: str
    org_id: str
    event_id: str
    event_type: str
    attempt: int
    success: bool
    status_code: int | None
    error_kind: str | None
    error_message: str | None
    duration_ms: int
    response_body: str | None
    created_at: datetime


DeliveryState = Literal["pending", "succeeded", "failed"]


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt and what it changes: the delivery's state and the endpoint's failure run."""

    attempt: Attempt
    delivery_state: DeliveryState
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    data: list[T]
    has_more: bool
    next_cursor: str | None


def _token(row: sa.Row[Any]) -> Token:
    return Token(
        id=row.id,
        org_id=row.org_id,
        name=row.name,
        scopes=tuple(row.scopes),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


def _webhook(row: sa.Row[Any]) -> Webhook:
    return Webhook(
        id=row.id,
        org_id=row.org_id,
        url=row.url,
        events=tuple(row.events),
        enabled=row.enabled,
        description=row.description,
        secret=row.secret,
        previous_secret=row.previous_secret,
        previous_secret_expires_at=row.previous_secret_expires_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        disabled_reason=row.disabled_reason,
        failing_since=row.failing_since,
    )


def _attempt(row: sa.Row[Any]) -> Attempt:
    return Attempt(**row._asdict())


def _page(items: list[T], limit: int, cursor_of: Any) -> Page[T]:  # noqa: ANN401 - a key function
    has_more = len(items) > limit
    items = items[:limit]
    return Page(items, has_more, cursor_of(items[-1]) if has_more and items else None)


class Store:
    """The service's persistence, over one SQLAlchemy async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name

    def _insert_ignoring_duplicates(self, table: sa.Table) -> Any:  # noqa: ANN401 - dialect-specific Insert
        insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        return insert(table).on_conflict_do_nothing()

    async def ping(self) -> None:
        async with self.engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    # --- tokens ---------------------------------------------------------------------------

    async def create_token(
        self, org_id: str, scopes: Sequence[str], name: str
    ) -> tuple[Token, str]:
        """Create a token; return it and its plaintext, which is stored nowhere."""
        plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = Token(
            id=new_id("tok"),
            org_id=org_id,
            name=name,
            scopes=tuple(dict.fromkeys(scopes)),
            created_at=utcnow(),
            revoked_at=None,
            last_used_at=None,
        )
        async with self.engine.begin() as connection:
            await connection.execute(
                api_tokens.insert().values(
                    id=token.id,
                    org_id=org_id,
                    name=name,
                    scopes=list(token.scopes),
                    token_hash=hash_token(plaintext),
                    created_at=token.created_at,
                )
            )
        return token, plaintext

    async def list_tokens(self) -> list[Token]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                sa.select(api_tokens).order_by(api_tokens.c.org_id, api_tokens.c.id)
            )
            return [_token(row) for row in rows]

    async def revoke_token(self, token_id: str) -> bool:
        async with self.engine.begin() as connection:
            result = await connection.execute(
                api_tokens.update()
                .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            return result.rowcount > 0

    async def authenticate(self, plaintext: str) -> Token | None:
        """The live token whose hash matches, or None. Revocation counts from the next call."""
        digest = hash_token(plaintext)
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    sa.select(api_tokens, api_tokens.c.token_hash).where(
                        api_tokens.c.token_hash == digest
                    )
                )
            ).first()
        # The index lookup finds the row; the constant-time compare keeps the final check free
        # of timing differences.
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at:
            return None
        token = _token(row)
        now = utcnow()
        if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
            async with self.engine.begin() as connection:
                await connection.execute(
                    api_tokens.update().where(api_tokens.c.id == token.id).values(last_used_at=now)
                )
        return token

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
                    secret=webhook.secret,
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
            rows = [_webhook(row) for row in await connection.execute(query)]
        return _page(rows, limit, lambda w: w.id)

    async def get_webhook(self, webhook_id: str, org_id: str | None = None) -> Webhook | None:
        """The endpoint; with ``org_id``, only if it belongs to that organization."""
        query = sa.select(webhooks).where(webhooks.c.id == webhook_id)
        if org_id is not None:
            query = query.where(webhooks.c.org_id == org_id)
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return _webhook(row) if row else None

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
        return _webhook(row)

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
                        secret=new_signing_secret(),
                        previous_secret=current.secret,
                        previous_secret_expires_at=now + overlap,
                        updated_at=now,
                    )
                    .returning(*webhooks.c)
                )
            ).one()
        return _webhook(row)

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

    async def subscribed_webhook_ids(self, org_id: str, event_type: str) -> list[str]:
        """Enabled endpoints of ``org_id`` subscribed to ``event_type``, found by index."""
        query = (
            sa.select(webhook_subscriptions.c.webhook_id)
            .join(webhooks, webhooks.c.id == webhook_subscriptions.c.webhook_id)
            .where(
                webhook_subscriptions.c.org_id == org_id,
                webhook_subscriptions.c.event_type == event_type,
                webhooks.c.enabled.is_(True),
            )
            .order_by(webhook_subscriptions.c.webhook_id)
        )
        async with self.engine.connect() as connection:
            return list((await connection.execute(query)).scalars())

    # --- events and deliveries -------------------------------------------------------------

    async def store_event_and_deliveries(
        self, event: dict[str, Any], occurred_at: datetime, webhook_ids: Sequence[str]
    ) -> None:
        """Keep the event and open one delivery per endpoint; repeating this is harmless."""
        now = utcnow()
        async with self.engine.begin() as connection:
            await connection.execute(
                self._insert_ignoring_duplicates(events).values(
                    id=event["id"],
                    org_id=event["organization_id"],
                    type=event["type"],
                    occurred_at=occurred_at,
                    payload=event,
                    received_at=now,
                )
            )
            if webhook_ids:
                await connection.execute(
                    self._insert_ignoring_duplicates(deliveries),
                    [
                        {
                            "event_id": event["id"],
                            "webhook_id": webhook_id,
                            "state": "pending",
                            "attempts": 0,
                            "next_attempt_at": now,
                            "created_at": now,
                            "updated_at": now,
                        }
                        for webhook_id in webhook_ids
                    ],
                )

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
        if not records:
            return
        async with self.engine.begin() as connection:
            await connection.execute(
                attempts.insert(), [_attempt_values(r.attempt) for r in records]
            )
            for record in records:
                attempt = record.attempt
                await connection.execute(
                    self._insert_ignoring_duplicates(deliveries).values(
                        event_id=attempt.event_id,
                        webhook_id=attempt.webhook_id,
                        state="pending",
                        attempts=0,
                        created_at=attempt.created_at,
                        updated_at=attempt.created_at,
                    )
                )
                await connection.execute(
                    deliveries.update()
                    .where(
                        deliveries.c.event_id == attempt.event_id,
                        deliveries.c.webhook_id == attempt.webhook_id,
                    )
                    .values(
                        state=record.delivery_state,
                        attempts=sa.func.max(deliveries.c.attempts, attempt.attempt)
                        if self._dialect == "sqlite"
                        else sa.func.greatest(deliveries.c.attempts, attempt.attempt),
                        next_attempt_at=record.next_attempt_at,
                        updated_at=attempt.created_at,
                    )
                )
            await self._track_failure_runs(connection, records)

    async def _track_failure_runs(
        self, connection: AsyncConnection, records: Sequence[AttemptRecord]
    ) -> None:
        succeeded = {r.attempt.webhook_id for r in records if r.attempt.success}
        failed: dict[str, datetime] = {}
        for r in records:
            if not r.attempt.success and r.attempt.webhook_id not in succeeded:
                failed.setdefault(r.attempt.webhook_id, r.attempt.created_at)
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
