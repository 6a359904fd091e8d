"""auth: revocations (per-subject not-before, issue 13) and erasure state (issue 20)

Revision ID: auth_0003
Revises: auth_0002
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "auth_0003"
down_revision = "auth_0002"
branch_labels = None
depends_on = None

S = "auth"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "revocations",
        sa.Column("subject", sa.String(200), primary_key=True),
        sa.Column("not_before", sa.Double, nullable=False),
        schema=S,
    )
    op.create_table(
        "erasures",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("subject_hash", sa.String(64), nullable=False, index=True),
        sa.Column("user_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("actor_role", sa.String(32), nullable=False, server_default=""),
        sa.Column("confirmed", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", TS, nullable=True),
        schema=S,
    )
    # Keys minted by a key used to get no owner (issue 13); an ownerless key is refused from now on.


def downgrade() -> None:
    op.drop_table("erasures", schema=S)
    op.drop_table("revocations", schema=S)
