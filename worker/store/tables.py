"""The database schema, as SQLAlchemy Core tables; Alembic migrations create exactly these."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite keeps no zone, so values are stored as naive UTC and given their zone back on read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, _dialect: Dialect) -> datetime | None:  # noqa: ANN401 - SQLAlchemy's own signature
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def one_of(
    column: sa.ColumnElement[str], values: Iterable[str], dialect: Dialect
) -> sa.ColumnElement[bool]:
    """``column IN values``, as one statement however many the values are.

    ``IN`` gives each value a placeholder of its own, so every list length is a different
    statement, and asyncpg prepares and caches each one on each pooled connection (100 per
    connection, kept for the connection's life). The worker's lookups and leases come in
    batches of any size: a spell of retries filled those caches with hundreds of statements,
    whose memory the process then kept. On PostgreSQL the values go as one array instead
    (``= ANY``); SQLite, which has no arrays, keeps ``IN``.
    """
    values = list(values)
    if dialect.name == "postgresql":
        array = sa.bindparam(None, values, type_=postgresql.ARRAY(column.type))
        return column == sa.any_(array)
    return column.in_(values)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False, index=True),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("scopes", sa.JSON, nullable=False),
    # SHA-256 of the token: a copy of the database never yields a usable token.
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime),
    sa.Column("last_used_at", UTCDateTime),
)

webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("events", sa.JSON, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("description", sa.String(1000), nullable=False, server_default=""),
    sa.Column("secret", sa.String(200), nullable=False),
    # During a rotation the previous secret still signs until it expires.
    sa.Column("previous_secret", sa.String(200)),
    sa.Column("previous_secret_expires_at", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("disabled_reason", sa.String(500)),
    # Start of the current run of failures; cleared by any success. Drives auto-disable.
    sa.Column("failing_since", UTCDateTime),
    # The endpoint's own request headers, {name: value}; customer data, like the payloads.
    sa.Column("headers", sa.JSON, nullable=False, server_default="{}"),
    sa.Column("rate_limit", sa.Integer),  # attempts per second; NULL: none
    sa.Column("timeout_seconds", sa.Integer),  # NULL: the service's DELIVERY_TIMEOUT
    sa.Column("ordered", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_webhooks_org_id_id", "org_id", "id"),
    # The few endpoints whose policies every worker enforces itself (rate limit, ordering).
    sa.Index(
        "ix_webhooks_policies",
        "id",
        postgresql_where=sa.text("rate_limit IS NOT NULL OR ordered"),
        sqlite_where=sa.text("rate_limit IS NOT NULL OR ordered"),
    ),
)

# One row per (endpoint, event type) it subscribes to: fan-out finds an event's endpoints by
# index instead of scanning every endpoint's list.
webhook_subscriptions = sa.Table(
    "webhook_subscriptions",
    metadata,
    sa.Column(
        "webhook_id",
        sa.String(40),
        sa.ForeignKey("webhooks.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("event_type", sa.String(100), primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Index("ix_webhook_subscriptions_org_id_event_type", "org_id", "event_type"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(100), nullable=False),
    sa.Column("occurred_at", UTCDateTime, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("received_at", UTCDateTime, nullable=False, index=True),
    # GET /events: an organization's events newest first, keyset on (received_at, id).
    sa.Index("ix_events_org_id_received_at_id", "org_id", "received_at", "id"),
    sa.Index("ix_events_org_id_type_received_at_id", "org_id", "type", "received_at", "id"),
)

# One row per (event, endpoint): the idempotency key of a delivery.
deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("event_id", sa.String(100), primary_key=True),
    sa.Column("webhook_id", sa.String(40), primary_key=True),
    # pending | succeeded | failed, or parked: waiting here, not in the broker, until its
    # slow endpoint has room (see worker.pipeline.parking).
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index(
        "ix_deliveries_parked",
        "webhook_id",
        "created_at",
        postgresql_where=sa.text("state = 'parked'"),
        sqlite_where=sa.text("state = 'parked'"),
    ),
    # Stats' backlog: counts by state of one endpoint; and any lookup by endpoint alone.
    sa.Index("ix_deliveries_webhook_id_state", "webhook_id", "state"),
    # Recoveries: one endpoint's deliveries in a window, keyset on (created_at, event_id).
    sa.Index(
        "ix_deliveries_webhook_id_created_at_event_id", "webhook_id", "created_at", "event_id"
    ),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("webhook_id", sa.String(40), nullable=False),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("event_id", sa.String(100), nullable=False),
    sa.Column("event_type", sa.String(100), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("success", sa.Boolean, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error_kind", sa.String(40)),
    sa.Column("error_message", sa.String(1000)),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("response_body", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False, index=True),
    sa.Index("ix_attempts_webhook_id_id", "webhook_id", "id"),
    # Stats: one endpoint's attempts in a time window.
    sa.Index("ix_attempts_webhook_id_created_at", "webhook_id", "created_at"),
    # An event's attempts (GET /events/{id}), and the event_id filter of the deliveries list.
    sa.Index("ix_attempts_event_id_webhook_id", "event_id", "webhook_id"),
)

# POST /webhooks/{id}/recover: a window of an endpoint's deliveries, parked again batch by
# batch (worker.store.recoveries). The cursor is the (created_at, event_id) of the last
# delivery parked, so a recovery resumes exactly where it was after a crash.
recoveries = sa.Table(
    "recoveries",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("org_id", sa.String(64), nullable=False),
    sa.Column("webhook_id", sa.String(40), nullable=False),
    sa.Column("since", UTCDateTime, nullable=False),
    sa.Column("until", UTCDateTime, nullable=False),
    # False when the request gave no until (it is then the creation time).
    sa.Column("until_given", sa.Boolean, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # failed | all
    sa.Column("state", sa.String(16), nullable=False),  # running | done
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("queued", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cursor_created_at", UTCDateTime),
    sa.Column("cursor_event_id", sa.String(100)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_recoveries_webhook_id_state", "webhook_id", "state"),
    sa.Index("ix_recoveries_state", "state"),
)
