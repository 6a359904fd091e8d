"""auth: audit log of admin actions, entity ids linked to users (privacy)

Revision ID: auth_0002
Revises: auth_0001
Create Date: 2025-02-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "auth_0002"
down_revision = "auth_0001"
branch_labels = None
depends_on = None

S = "auth"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("time", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("service", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("actor_role", sa.String(32), nullable=False, server_default=""),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300), nullable=False, server_default=""),
        sa.Column("details", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        # Events from other services arrive on a Redis stream: its entry id makes delivery idempotent.
        sa.Column("stream_id", sa.String(40), nullable=True, unique=True),
        schema=S,
    )
    op.create_index("audit_log_time_idx", "audit_log", ["time"], schema=S)
    op.create_index("audit_log_action_idx", "audit_log", ["action", "time"], schema=S)
    op.create_table(
        "subject_links",
        sa.Column("user_id", postgresql.UUID(as_uuid=True), sa.ForeignKey(f"{S}.users.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("entity", sa.String(63), primary_key=True),
        sa.Column("entity_id", sa.String(200), primary_key=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("subject_links", schema=S)
    op.drop_index("audit_log_action_idx", table_name="audit_log", schema=S)
    op.drop_index("audit_log_time_idx", table_name="audit_log", schema=S)
    op.drop_table("audit_log", schema=S)
