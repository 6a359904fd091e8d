"""feature store: registry, offline store, materialisation state

Revision ID: features_0001
Revises:
Create Date: 2025-01-01 00:00:00
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "features_0001"
down_revision = None
branch_labels = None
depends_on = None

S = "features"


def _ts(name: str, nullable: bool = False, default: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable,
                     server_default=sa.func.now() if default else None)


def upgrade() -> None:
    op.create_table(
        "entities",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("join_key", sa.Text, nullable=False),
        sa.Column("dtype", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("version", sa.Integer, nullable=False),
        _ts("created_at"), _ts("updated_at"),
        schema=S,
    )
    op.create_table(
        "feature_views",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("entity", sa.Text, sa.ForeignKey(f"{S}.entities.name"), nullable=False),
        sa.Column("features", JSONB, nullable=False),
        sa.Column("ttl_seconds", sa.Integer, nullable=False),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.Text, nullable=False, server_default=""),
        sa.Column("tags", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("version", sa.Integer, nullable=False),
        _ts("created_at"), _ts("updated_at"),
        schema=S,
    )
    op.create_table(
        "registry_history",
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("spec", JSONB, nullable=False),
        _ts("changed_at"),
        sa.PrimaryKeyConstraint("kind", "name", "version"),
        schema=S,
    )
    op.create_table(
        "offline_rows",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("view", sa.Text, nullable=False),
        sa.Column("entity_key", sa.Text, nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        _ts("created_at"),
        sa.Column("values", JSONB, nullable=False),
        sa.Column("source", sa.Text, nullable=False, server_default="push"),
        schema=S,
    )
    op.create_index("offline_rows_pit", "offline_rows",
                    ["view", "entity_key", sa.text("event_time DESC"), sa.text("created_at DESC")], schema=S)
    op.create_index("offline_rows_view_event", "offline_rows", ["view", "event_time"], schema=S)
    op.create_index("offline_rows_view_created", "offline_rows", ["view", "created_at"], schema=S)
    op.create_table(
        "materialization_state",
        sa.Column("view", sa.Text, primary_key=True),
        sa.Column("event_time_to", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_to", sa.DateTime(timezone=True), nullable=False),
        _ts("updated_at"),
        schema=S,
    )
    op.create_table(
        "materialization_runs",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("view", sa.Text, nullable=False),
        sa.Column("incremental", sa.Boolean, nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True)),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entities", sa.Integer, nullable=False),
        sa.Column("written", sa.Integer, nullable=False),
        _ts("started_at", default=False),
        _ts("finished_at"),
        schema=S,
    )
    op.create_index("materialization_runs_view", "materialization_runs", ["view", "id"], schema=S)


def downgrade() -> None:
    for table in ("materialization_runs", "materialization_state", "offline_rows", "registry_history",
                  "feature_views", "entities"):
        op.drop_table(table, schema=S)
