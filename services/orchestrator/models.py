"""Tables of the orchestrator's schema."""
from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, func
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(schema="orchestrator")

# Append-only: the current policy of a model is its newest row; older rows are the history.
policies = Table(
    "policies", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("model", Text, nullable=False, index=True),
    Column("policy", JSONB, nullable=False),
    Column("author", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
