"""Registry tables (SQLAlchemy Core). Alembic migrations in `adapters/migrations` create them;
`tests/unit/test_registry_store.py` checks that the migrated schema matches this module."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# One row: bumped by every mutation so other replicas know to reload their snapshot.
registry_meta = Table(
    "registry_meta",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("generation", BigInteger, nullable=False),
)

# Per adapter name: the version counter (numbers are never reused, even after a delete).
adapter_names = Table(
    "adapter_names",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("last_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)

adapter_versions = Table(
    "adapter_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("digest", String(80), nullable=False),
    Column("base_digest", String(80), nullable=True),
    Column("rank", Integer, nullable=False),
    Column("alpha", Float, nullable=False),
    Column("target_modules", JSON, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("source_uri", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("state_reason", Text, nullable=True),
    Column("pinned", Boolean, nullable=False),
    Column("meta", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("name", "version", name="uq_adapter_versions_name_version"),
    ForeignKeyConstraint(["name"], ["adapter_names.name"], name="fk_adapter_versions_name"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("alias", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
    ForeignKeyConstraint(
        ["name", "version"],
        ["adapter_versions.name", "adapter_versions.version"],
        name="fk_aliases_version",
    ),
)

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("key_digests", JSON, nullable=False),
    Column("adapters", JSON, nullable=False),
    Column("default_model", String(140), nullable=True),
    Column("quotas", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(140), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(200), nullable=False),
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=True),
    Column("request_id", String(128), nullable=True),
    Index("ix_audit_log_at", "at"),
)

# A/B experiments (router.experiments parses `definition`); mutations are audited like the rest.
experiments = Table(
    "experiments",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("target", String(140), nullable=False),
    Column("definition", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("weights", JSON, nullable=False),
    Column("ramp_step", Integer, nullable=False),
    Column("step_started_at", Float, nullable=False),
    Column("reason", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Leader leases (e.g. the experiment controller): one holder until `expires_at`.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(140), nullable=False),
    Column("expires_at", Float, nullable=False),
)

# Per-tenant drift reference windows (server.telemetry.drift payloads).
drift_references = Table(
    "drift_references",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("payload", JSON, nullable=False),
    Column("updated_at", Float, nullable=False),
)
