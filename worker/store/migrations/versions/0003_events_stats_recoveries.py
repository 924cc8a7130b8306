"""Indexes for the events list, stats and delivery filters; the recoveries table.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)

INDEXES: tuple[tuple[str, str, list[str]], ...] = (
    ("ix_events_org_id_received_at_id", "events", ["org_id", "received_at", "id"]),
    ("ix_events_org_id_type_received_at_id", "events", ["org_id", "type", "received_at", "id"]),
    ("ix_deliveries_webhook_id_state", "deliveries", ["webhook_id", "state"]),
    (
        "ix_deliveries_webhook_id_created_at_event_id",
        "deliveries",
        ["webhook_id", "created_at", "event_id"],
    ),
    ("ix_attempts_webhook_id_created_at", "attempts", ["webhook_id", "created_at"]),
    ("ix_attempts_event_id_webhook_id", "attempts", ["event_id", "webhook_id"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    op.create_table(
        "recoveries",
        sa.Column("id", sa.String(40)),
        sa.Column("org_id", sa.String(64), nullable=False),
        sa.Column("webhook_id", sa.String(40), nullable=False),
        sa.Column("since", Timestamp, nullable=False),
        sa.Column("until", Timestamp, nullable=False),
        sa.Column("until_given", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("queued", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cursor_created_at", Timestamp),
        sa.Column("cursor_event_id", sa.String(100)),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp),
        sa.PrimaryKeyConstraint("id", name="pk_recoveries"),
    )
    op.create_index("ix_recoveries_webhook_id_state", "recoveries", ["webhook_id", "state"])
    op.create_index("ix_recoveries_state", "recoveries", ["state"])


def downgrade() -> None:
    op.drop_index("ix_recoveries_state", table_name="recoveries")
    op.drop_index("ix_recoveries_webhook_id_state", table_name="recoveries")
    op.drop_table("recoveries")
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
