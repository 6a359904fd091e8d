"""pipeline: batch jobs, persisted prediction log and feedback, quality, drift, training runs

Revision ID: pipeline_0001
Revises:
Create Date: 2025-01-01 00:00:00
"""
from alembic import op

revision = "pipeline_0001"
down_revision = None
branch_labels = None
depends_on = None


STATEMENTS = [
    """
    CREATE TABLE pipeline.jobs (
        id text PRIMARY KEY,
        kind text NOT NULL DEFAULT 'batch-inference',
        status text NOT NULL CHECK (status IN ('queued','running','succeeded','failed','cancelled')),
        model text NOT NULL,
        version text,
        resolved_version text,
        input_path text NOT NULL,
        input_format text NOT NULL,
        chunk_rows integer NOT NULL,
        batch_rows integer NOT NULL,
        total_chunks integer,
        total_rows bigint,
        principal text,
        error jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        started_at timestamptz,
        finished_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    """
    CREATE INDEX jobs_status ON pipeline.jobs (status)""",
    """
    CREATE TABLE pipeline.job_chunks (
        job_id text NOT NULL REFERENCES pipeline.jobs (id) ON DELETE CASCADE,
        idx integer NOT NULL,
        rows integer NOT NULL,
        done_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (job_id, idx)
    )""",
    """
    CREATE TABLE pipeline.predictions (
        prediction_id text NOT NULL,
        row integer NOT NULL,
        time timestamptz NOT NULL,
        principal text,
        model text NOT NULL,
        version text NOT NULL,
        input_hash text,
        inputs jsonb,
        outputs jsonb,
        latency_ms double precision,
        cached boolean NOT NULL DEFAULT false,
        stream_id text NOT NULL,
        PRIMARY KEY (prediction_id, row)
    )""",
    """
    CREATE INDEX predictions_model_time ON pipeline.predictions (model, version, time)""",
    """
    CREATE TABLE pipeline.feedback (
        prediction_id text NOT NULL,
        row integer NOT NULL,
        label jsonb NOT NULL,
        principal text,
        model text NOT NULL,
        version text NOT NULL,
        time timestamptz NOT NULL,
        stream_id text NOT NULL,
        PRIMARY KEY (prediction_id, row)
    )""",
    """
    CREATE TABLE pipeline.quality (
        id bigserial PRIMARY KEY,
        model text NOT NULL,
        version text NOT NULL,
        window_start timestamptz NOT NULL,
        window_end timestamptz NOT NULL,
        n integer NOT NULL,
        positives integer NOT NULL,
        accuracy double precision,
        "precision" double precision,
        recall double precision,
        f1 double precision,
        roc_auc double precision,
        counts jsonb NOT NULL,
        computed_at timestamptz NOT NULL DEFAULT now()
    )""",
    """
    CREATE INDEX quality_model ON pipeline.quality (model, computed_at DESC)""",
    """
    CREATE TABLE pipeline.drift (
        id bigserial PRIMARY KEY,
        model text NOT NULL,
        version text NOT NULL,
        window_start timestamptz NOT NULL,
        window_end timestamptz NOT NULL,
        n integer NOT NULL,
        psi jsonb NOT NULL,
        max_psi double precision,
        alert boolean NOT NULL,
        threshold double precision NOT NULL,
        computed_at timestamptz NOT NULL DEFAULT now()
    )""",
    """
    CREATE INDEX drift_model ON pipeline.drift (model, computed_at DESC)""",
    """
    CREATE TABLE pipeline.training_runs (
        id text PRIMARY KEY,
        model text NOT NULL,
        status text NOT NULL,
        version text,
        report jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    )""",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for table in ("training_runs", "drift", "quality", "feedback", "predictions", "job_chunks", "jobs"):
        op.execute(f"DROP TABLE IF EXISTS pipeline.{table}")
