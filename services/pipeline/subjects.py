"""Data-subject access and erasure for what the pipeline stores about a principal (docs/privacy.md).

A principal is the gateway's X-Principal: a user id, or `apikey:<id>`. The pipeline holds its
persisted predictions (schema `pipeline.predictions`), feedback it gave or that labels its
predictions (`pipeline.feedback`) and the batch jobs it submitted (`pipeline.jobs`, with their
files under PIPELINE_DATA_DIR/jobs/<id>).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import fetch_all

_FEEDBACK_OF = """(principal = :p OR prediction_id IN
                   (SELECT prediction_id FROM pipeline.predictions WHERE principal = :p))"""


async def export_subject(engine: AsyncEngine, principal: str) -> dict:
    predictions = await fetch_all(engine, """
        SELECT prediction_id, row, time, model, version, input_hash, inputs, outputs, latency_ms, cached
        FROM pipeline.predictions WHERE principal = :p ORDER BY time, prediction_id, row""", p=principal)
    feedback = await fetch_all(engine, f"""
        SELECT prediction_id, row, label, principal = :p AS given_by_subject, model, version, time
        FROM pipeline.feedback WHERE {_FEEDBACK_OF} ORDER BY time""", p=principal)
    jobs = await fetch_all(engine, """
        SELECT id, status, model, version, resolved_version, total_rows, created_at, finished_at
        FROM pipeline.jobs WHERE principal = :p ORDER BY created_at""", p=principal)
    return {"principal": principal, "predictions": predictions, "feedback": feedback, "jobs": jobs}


async def erase_subject(engine: AsyncEngine, principal: str, data_dir: str | Path | None = None) -> dict:
    """Delete the principal's rows (idempotent). Returns counts and the (model, input_hash) of the
    erased predictions, which auth hands to the orchestrator to drop their cached responses."""
    async with engine.begin() as conn:
        feedback = (await conn.execute(text(f"DELETE FROM pipeline.feedback WHERE {_FEEDBACK_OF}"),
                                       {"p": principal})).rowcount
        refs = (await conn.execute(text(
            "DELETE FROM pipeline.predictions WHERE principal = :p RETURNING prediction_id, model, input_hash"),
            {"p": principal})).all()
        jobs = [r[0] for r in (await conn.execute(text(
            "DELETE FROM pipeline.jobs WHERE principal = :p RETURNING id"), {"p": principal})).all()]
    if data_dir:
        for job_id in jobs:
            shutil.rmtree(Path(data_dir) / "jobs" / job_id, ignore_errors=True)
    unique = sorted({(pid, model, h) for pid, model, h in refs})
    return {"principal": principal, "predictions": len(refs), "feedback": feedback, "jobs": len(jobs),
            "refs": [{"prediction_id": pid, "model": model, "input_hash": h} for pid, model, h in unique]}
