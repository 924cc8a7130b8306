"""Alembic environment: migrations run on a connection handed in by ``worker.database``."""

from __future__ import annotations

from alembic import context

from worker.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run migrations with `sellfern-webhooks migrate`, which supplies the connection"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
