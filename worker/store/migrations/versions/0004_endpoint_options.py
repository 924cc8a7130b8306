"""Endpoint options: custom request headers, rate limit, timeout, ordered delivery.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = ("headers", "rate_limit", "timeout_seconds", "ordered")


def upgrade() -> None:
    # Additive with server defaults, so existing endpoints read as before (no headers, no
    # limit, DELIVERY_TIMEOUT, unordered) and a running older version keeps working.
    op.add_column("webhooks", sa.Column("headers", sa.JSON, nullable=False, server_default="{}"))
    op.add_column("webhooks", sa.Column("rate_limit", sa.Integer))
    op.add_column("webhooks", sa.Column("timeout_seconds", sa.Integer))
    op.add_column(
        "webhooks", sa.Column("ordered", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.create_index(
        "ix_webhooks_policies",
        "webhooks",
        ["id"],
        postgresql_where=sa.text("rate_limit IS NOT NULL OR ordered"),
        sqlite_where=sa.text("rate_limit IS NOT NULL OR ordered"),
    )


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN on SQLite too (3.35+), not batch mode: rebuilding the
    # table would drop it, and with foreign keys on that deletes its subscriptions in cascade.
    op.drop_index("ix_webhooks_policies", table_name="webhooks")
    for name in reversed(COLUMNS):
        op.drop_column("webhooks", name)
