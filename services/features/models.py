"""Tables of the feature store, all in the Postgres schema `features` (created by Alembic).

Registry: `entities`, `feature_views` (current spec and version) and `registry_history` (every
version of every object). Offline store: `offline_rows`, append-only, one JSONB document of
feature values per (view, entity key, event time). Materialisation: `materialization_state`
(how far the incremental run got per view) and `materialization_runs` (a log).
"""
from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

SCHEMA = "features"
metadata = MetaData(schema=SCHEMA)


def _ts(name: str, nullable: bool = False, default: bool = True) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable,
                  server_default=func.now() if default else None)


entities = Table(
    "entities", metadata,
    Column("name", Text, primary_key=True),
    Column("join_key", Text, nullable=False),
    Column("dtype", Text, nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("version", Integer, nullable=False),
    _ts("created_at"), _ts("updated_at"),
)

feature_views = Table(
    "feature_views", metadata,
    Column("name", Text, primary_key=True),
    Column("entity", Text, ForeignKey(f"{SCHEMA}.entities.name"), nullable=False),
    Column("features", JSONB, nullable=False),  # [{"name", "dtype", "description"}]
    Column("ttl_seconds", Integer, nullable=False),  # 0: values never expire
    Column("description", Text, nullable=False, server_default=""),
    Column("owner", Text, nullable=False, server_default=""),
    Column("tags", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("version", Integer, nullable=False),
    _ts("created_at"), _ts("updated_at"),
)

registry_history = Table(
    "registry_history", metadata,
    Column("kind", Text, nullable=False),  # "entity" | "feature_view"
    Column("name", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("action", Text, nullable=False),  # "created" | "updated" | "deleted"
    Column("spec", JSONB, nullable=False),
    _ts("changed_at"),
    PrimaryKeyConstraint("kind", "name", "version"),
)

offline_rows = Table(
    "offline_rows", metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("view", Text, nullable=False),
    Column("entity_key", Text, nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    _ts("created_at"),
    Column("values", JSONB, nullable=False),
    Column("source", Text, nullable=False, server_default="push"),
    # Point-in-time lookups and "latest per entity": newest first within (view, entity).
    Index("offline_rows_pit", "view", "entity_key", text("event_time DESC"), text("created_at DESC")),
    # Materialisation windows and freshness (max event time per view).
    Index("offline_rows_view_event", "view", "event_time"),
    # Late-arriving rows picked up by incremental materialisation.
    Index("offline_rows_view_created", "view", "created_at"),
)

materialization_state = Table(
    "materialization_state", metadata,
    Column("view", Text, primary_key=True),
    Column("event_time_to", DateTime(timezone=True), nullable=False),
    Column("created_to", DateTime(timezone=True), nullable=False),
    _ts("updated_at"),
)

materialization_runs = Table(
    "materialization_runs", metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("view", Text, nullable=False),
    Column("incremental", Boolean, nullable=False),
    Column("window_start", DateTime(timezone=True)),
    Column("window_end", DateTime(timezone=True), nullable=False),
    Column("entities", Integer, nullable=False),
    Column("written", Integer, nullable=False),
    _ts("started_at", default=False, nullable=False),
    _ts("finished_at"),
    Index("materialization_runs_view", "view", "id"),
)
