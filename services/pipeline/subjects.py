"""Data-subject access and erasure for what the pipeline stores about a principal (docs/privacy.md).

A principal is the gateway's X-Principal: a user id, or `apikey:<id>`. The pipeline holds its
persisted predictions (`pipeline.predictions`), feedback it gave or that labels its predictions
(`pipeline.feedback`) and the batch jobs it submitted (`pipeline.jobs`, or whose X-Principal-Owner
it is, with their files under PIPELINE_DATA_DIR/jobs/<id>: the upload, chunk inputs, result parts).
The export carries each job's input and result rows (up to EXPORT_ROWS each, with a download link
for the whole result while it exists); erasure deletes the rows and the job directories.
"""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from . import batch, store
from .tables import feedback, predictions

EXPORT_ROWS = 10_000


def _feedback_of(principal: str):
    return or_(feedback.c.principal == principal, feedback.c.prediction_id.in_(
        select(predictions.c.prediction_id).where(predictions.c.principal == principal)))


def _job_data(data_dir: str | Path, job: dict) -> dict:
    files = batch.JobFiles(data_dir, job["id"])
    total = job.get("total_chunks") or 0
    inputs = batch.read_rows(files, total, "chunks", EXPORT_ROWS)
    results = batch.read_rows(files, total, "parts", EXPORT_ROWS)
    rows = int(job.get("total_rows") or 0)
    return {"input_rows": inputs, "result_rows": results,
            "truncated": rows > EXPORT_ROWS,
            "result_url": f"/v1/jobs/{job['id']}/result" if job["status"] == "succeeded" and files.root.is_dir()
            else None}


async def export_subject(engine: AsyncEngine, principal: str, data_dir: str | Path | None = None) -> dict:
    async with engine.connect() as conn:
        preds = [dict(r._mapping) for r in await conn.execute(
            select(predictions.c.prediction_id, predictions.c.row, predictions.c.time, predictions.c.model,
                   predictions.c.version, predictions.c.input_hash, predictions.c.inputs, predictions.c.outputs,
                   predictions.c.latency_ms, predictions.c.cached)
            .where(predictions.c.principal == principal)
            .order_by(predictions.c.time, predictions.c.prediction_id, predictions.c.row))]
        fb = [dict(r._mapping) for r in await conn.execute(
            select(feedback.c.prediction_id, feedback.c.row, feedback.c.label,
                   (feedback.c.principal == principal).label("given_by_subject"), feedback.c.model,
                   feedback.c.version, feedback.c.time)
            .where(_feedback_of(principal)).order_by(feedback.c.time))]
    jobs = []
    for job in await store.subject_jobs(engine, principal):
        entry = {k: job[k] for k in ("id", "status", "model", "version", "resolved_version", "total_rows",
                                     "created_at", "finished_at")}
        entry["submitted_by"] = job["principal"]
        if data_dir:
            entry.update(await asyncio.to_thread(_job_data, data_dir, job))
        jobs.append(entry)
    return {"principal": principal, "predictions": preds, "feedback": fb, "jobs": jobs}


async def erase_subject(engine: AsyncEngine, principal: str, data_dir: str | Path | None = None) -> dict:
    """Delete the principal's rows and job files (idempotent). Returns counts and the (model,
    input_hash) of the erased predictions, which auth hands to the orchestrator to drop their
    cached responses."""
    async with engine.begin() as conn:
        n_feedback = (await conn.execute(delete(feedback).where(_feedback_of(principal)))).rowcount
        refs = (await conn.execute(delete(predictions).where(predictions.c.principal == principal).returning(
            predictions.c.prediction_id, predictions.c.model, predictions.c.input_hash))).all()
        jobs = await store.erase_subject_jobs(conn, principal)
    if data_dir:
        for job in jobs:
            shutil.rmtree(Path(data_dir) / "jobs" / job["id"], ignore_errors=True)
    unique = sorted({(pid, model, h) for pid, model, h in refs})
    return {"principal": principal, "predictions": len(refs), "feedback": n_feedback, "jobs": len(jobs),
            "refs": [{"prediction_id": pid, "model": model, "input_hash": h} for pid, model, h in unique]}
