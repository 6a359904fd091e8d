"""pipeline: job ownership and quotas, chunk leases, idempotency keys (issues 13 and 15)

Revision ID: pipeline_0002
Revises: pipeline_0001
Create Date: 2026-12-01 05:00:00
"""
from alembic import op

revision = "pipeline_0002"
down_revision = "pipeline_0001"
branch_labels = None
depends_on = None

STATEMENTS = [
    # The owning subject (X-Principal-Owner: the user behind an API key) so erasure finds the job;
    # the upload's size for the byte quota; the request fingerprint for Idempotency-Key.
    "ALTER TABLE pipeline.jobs ADD COLUMN owner text",
    "ALTER TABLE pipeline.jobs ADD COLUMN input_bytes bigint",
    "ALTER TABLE pipeline.jobs ADD COLUMN uploaded boolean NOT NULL DEFAULT false",
    "CREATE INDEX jobs_principal ON pipeline.jobs (principal, created_at DESC)",
    "CREATE INDEX jobs_owner ON pipeline.jobs (owner)",
    """
    CREATE TABLE pipeline.chunk_leases (
        job_id text NOT NULL REFERENCES pipeline.jobs (id) ON DELETE CASCADE,
        idx integer NOT NULL,
        worker text NOT NULL,
        attempts integer NOT NULL DEFAULT 1,
        leased_until timestamptz NOT NULL,
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (job_id, idx)
    )""",
    "CREATE INDEX chunk_leases_until ON pipeline.chunk_leases (leased_until)",
    """
    CREATE TABLE pipeline.idempotency_keys (
        principal text NOT NULL,
        key text NOT NULL,
        request_hash text NOT NULL,
        job_id text NOT NULL REFERENCES pipeline.jobs (id) ON DELETE CASCADE,
        created_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (principal, key)
    )""",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS pipeline.idempotency_keys")
    op.execute("DROP TABLE IF EXISTS pipeline.chunk_leases")
    op.execute("DROP INDEX IF EXISTS pipeline.jobs_owner")
    op.execute("DROP INDEX IF EXISTS pipeline.jobs_principal")
    for column in ("uploaded", "input_bytes", "owner"):
        op.execute(f"ALTER TABLE pipeline.jobs DROP COLUMN IF EXISTS {column}")
