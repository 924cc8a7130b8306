"""Parked deliveries: an index over the deliveries that wait in the database for their endpoint.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PARKED = sa.text("state = 'parked'")


def upgrade() -> None:
    # Partial: it holds only the parked rows, however many deliveries the table keeps.
    op.create_index(
        "ix_deliveries_parked",
        "deliveries",
        ["webhook_id", "created_at"],
        postgresql_where=PARKED,
        sqlite_where=PARKED,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_parked", table_name="deliveries")
