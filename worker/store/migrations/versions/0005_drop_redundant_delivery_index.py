"""Drop ix_deliveries_webhook_id: ix_deliveries_webhook_id_state begins with the same column.

Every lookup of one endpoint's deliveries (its stats, the cascade when it is deleted) is served
as well by the two-column index, while every delivery written, and again when its attempt
advances it (the state changes, so the update cannot skip the indexes), paid for both.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_deliveries_webhook_id", table_name="deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_webhook_id", "deliveries", ["webhook_id"])
