"""The pipeline's Postgres schema as SQLAlchemy Core tables: the one persistence style of the
pipeline (queries are built from these, never written as SQL strings). The migrations in
migrations/versions create them; keep both in step."""
from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(schema="pipeline")

jobs = Table(
    "jobs", metadata,
    Column("id", Text, primary_key=True),
    Column("kind", Text, nullable=False, server_default="batch-inference"),
    Column("status", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("version", Text),
    Column("resolved_version", Text),
    Column("input_path", Text, nullable=False),
    Column("input_format", Text, nullable=False),
    Column("chunk_rows", Integer, nullable=False),
    Column("batch_rows", Integer, nullable=False),
    Column("total_chunks", Integer),
    Column("total_rows", BigInteger),
    Column("principal", Text),
    Column("owner", Text),
    Column("input_bytes", BigInteger),
    Column("uploaded", Boolean, nullable=False, server_default="false"),
    Column("error", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

job_chunks = Table(
    "job_chunks", metadata,
    Column("job_id", Text, primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("rows", Integer, nullable=False),
    Column("done_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

chunk_leases = Table(
    "chunk_leases", metadata,
    Column("job_id", Text, primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("worker", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("leased_until", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("principal", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("request_hash", Text, nullable=False),
    Column("job_id", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

predictions = Table(
    "predictions", metadata,
    Column("prediction_id", Text, primary_key=True),
    Column("row", Integer, primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("principal", Text),
    Column("model", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("input_hash", Text),
    Column("inputs", JSONB),
    Column("outputs", JSONB),
    Column("latency_ms", Float),
    Column("cached", Boolean, nullable=False, server_default="false"),
    Column("stream_id", Text, nullable=False),
)

feedback = Table(
    "feedback", metadata,
    Column("prediction_id", Text, primary_key=True),
    Column("row", Integer, primary_key=True),
    Column("label", JSONB, nullable=False),
    Column("principal", Text),
    Column("model", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("stream_id", Text, nullable=False),
)

quality = Table(
    "quality", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("model", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("window_end", DateTime(timezone=True), nullable=False),
    Column("n", Integer, nullable=False),
    Column("positives", Integer, nullable=False),
    Column("accuracy", Float),
    Column("precision", Float),
    Column("recall", Float),
    Column("f1", Float),
    Column("roc_auc", Float),
    Column("counts", JSONB, nullable=False),
    Column("computed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

drift = Table(
    "drift", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("model", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("window_start", DateTime(timezone=True), nullable=False),
    Column("window_end", DateTime(timezone=True), nullable=False),
    Column("n", Integer, nullable=False),
    Column("psi", JSONB, nullable=False),
    Column("max_psi", Float),
    Column("alert", Boolean, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("computed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

training_runs = Table(
    "training_runs", metadata,
    Column("id", Text, primary_key=True),
    Column("model", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("version", Text),
    Column("report", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
