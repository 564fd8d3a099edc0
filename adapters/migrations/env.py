"""Alembic environment: runs on the connection the registry hands over (sync facade of its
async engine), so migrations use the same URL, driver and lock as the gateway."""

from __future__ import annotations

from alembic import context

from adapters.registry_schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the registry always passes one
    raise RuntimeError("run migrations through adapters.registry.Registry.open()")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
