"""Initial schema: tokens, endpoints and their subscriptions, events, deliveries, attempts.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False, server_default=""),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("revoked_at", Timestamp),
        sa.Column("last_used_at", Timestamp),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_org_id", "api_tokens", ["org_id"])

    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(40)),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("events", sa.JSON, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("description", sa.String(1000), nullable=False, server_default=""),
        sa.Column("secret", sa.String(200), nullable=False),
        sa.Column("previous_secret", sa.String(200)),
        sa.Column("previous_secret_expires_at", Timestamp),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Column("disabled_reason", sa.String(500)),
        sa.Column("failing_since", Timestamp),
        sa.PrimaryKeyConstraint("id", name="pk_webhooks"),
    )
    op.create_index("ix_webhooks_org_id_id", "webhooks", ["org_id", "id"])

    op.create_table(
        "webhook_subscriptions",
        sa.Column("webhook_id", sa.String(40), nullable=False),
        sa.Column("event_type", sa.String(100), nullable=False),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("webhook_id", "event_type", name="pk_webhook_subscriptions"),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name="fk_webhook_subscriptions_webhook_id_webhooks",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_webhook_subscriptions_org_id_event_type",
        "webhook_subscriptions",
        ["org_id", "event_type"],
    )

    op.create_table(
        "events",
        sa.Column("id", sa.String(100)),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("occurred_at", Timestamp, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_received_at", "events", ["received_at"])

    op.create_table(
        "deliveries",
        sa.Column("event_id", sa.String(100), nullable=False),
        sa.Column("webhook_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", Timestamp),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("event_id", "webhook_id", name="pk_deliveries"),
    )
    op.create_index("ix_deliveries_webhook_id", "deliveries", ["webhook_id"])

    op.create_table(
        "attempts",
        sa.Column("id", sa.String(40)),
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
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_attempts"),
    )
    op.create_index("ix_attempts_created_at", "attempts", ["created_at"])
    op.create_index("ix_attempts_webhook_id_id", "attempts", ["webhook_id", "id"])


def downgrade() -> None:
    for table in (
        "attempts",
        "deliveries",
        "events",
        "webhook_subscriptions",
        "webhooks",
        "api_tokens",
    ):
        op.drop_table(table)
