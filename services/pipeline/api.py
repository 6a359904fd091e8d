"""Routes of the pipeline's control app: the batch job API (public, through the gateway) and the
model quality / drift / training admin API. Routes parse and answer; the modules do the work."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from services.chassis.errors import AppError
from services.chassis.internal import require_internal
from services.model.client import ModelName, check_name

from . import batch, drift, quality
from .db import fetch_all

log = logging.getLogger("aistack.pipeline.api")
jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"])
admin = APIRouter(prefix="/admin", tags=["admin"])


class BatchJobRequest(BaseModel):
    path: str = Field(description="Server-side input, relative to (and inside) PIPELINE_DATA_DIR.")
    model: ModelName
    version: ModelName | None = None
    format: Literal["csv", "parquet"] | None = None
    chunk_rows: int | None = Field(default=None, ge=1, le=5_000_000)
    batch_rows: int | None = Field(default=None, ge=1, le=1_000_000)


_BODY_DOC = {"requestBody": {"content": {
    "application/json": {"schema": BatchJobRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file", "model"], "properties": {
        "file": {"type": "string", "format": "binary"}, "model": {"type": "string"},
        "version": {"type": "string"}, "format": {"type": "string", "enum": ["csv", "parquet"]},
        "chunk_rows": {"type": "integer"}, "batch_rows": {"type": "integer"}}}}}}}


def _int(value, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise AppError(422, "validation_error", f"{name} must be an integer") from None
    if v < 1:
        raise AppError(422, "validation_error", f"{name} must be positive")
    return v


async def _save_upload(upload, target: Path, limit: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.upload")
    size = 0
    with tmp.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                out.close()
                tmp.unlink(missing_ok=True)
                raise AppError(413, "payload_too_large", f"upload larger than {limit} bytes")
            out.write(chunk)
    os.replace(tmp, target)


@jobs.post("/batch-inference", status_code=202, openapi_extra=_BODY_DOC,
           summary="Submit a batch inference job (multipart upload or a server-side path)")
async def submit_batch(request: Request):
    settings, engine = request.app.state.settings, request.app.state.engine
    job_id = batch.new_job_id()
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise AppError(422, "validation_error", "multipart body needs a 'file' part")
        model = form.get("model")
        if not model:
            raise AppError(422, "validation_error", "multipart body needs a 'model' field")
        fmt = batch.detect_format(upload.filename or "", form.get("format") or None)
        version = form.get("version") or None
        check_name(model), version is None or check_name(version, "version")
        chunk_rows, batch_rows = _int(form.get("chunk_rows"), "chunk_rows"), _int(form.get("batch_rows"), "batch_rows")
        input_path = batch.JobFiles(settings.data_dir, job_id).upload(fmt)
        await _save_upload(upload, input_path, settings.max_upload_bytes)
    else:
        try:
            body = BatchJobRequest.model_validate_json(await request.body())
        except ValueError as exc:
            raise AppError(422, "validation_error", "body must be JSON {path, model, ...} or a multipart upload",
                           json.loads(exc.json()) if hasattr(exc, "json") else None) from None
        input_path = batch.resolve_server_path(settings.data_dir, body.path)
        fmt = batch.detect_format(input_path.name, body.format)
        model, version, chunk_rows, batch_rows = body.model, body.version, body.chunk_rows, body.batch_rows
    job = await batch.create_job(
        engine, job_id=job_id, model=str(model), version=str(version) if version else None, input_path=input_path,
        input_format=fmt, chunk_rows=chunk_rows or settings.chunk_rows, batch_rows=batch_rows or settings.infer_batch_rows,
        principal=request.headers.get("x-principal"))
    await run_in_threadpool(request.app.state.celery.send_task, "pipeline.prepare_job", args=[job_id])
    return batch.job_view(job)


async def _job(request: Request, job_id: str) -> dict:
    job = await batch.get_job(request.app.state.engine, job_id)
    if job is None:
        raise AppError(404, "job_not_found", f"no job '{job_id}'")
    return job


@jobs.get("", summary="Recent jobs")
async def list_jobs(request: Request, limit: int = Query(50, ge=1, le=500)):
    return {"jobs": [batch.job_view(j) for j in await batch.list_jobs(request.app.state.engine, limit)]}


@jobs.get("/{job_id}", summary="A job's state and progress")
async def get_job(request: Request, job_id: str):
    return batch.job_view(await _job(request, job_id))


@jobs.post("/{job_id}/cancel", summary="Cancel a queued or running job")
async def cancel_job(request: Request, job_id: str):
    return batch.job_view(await batch.cancel_job(request.app.state.engine, job_id))


@jobs.get("/{job_id}/result", summary="The result as one file, rows in input order")
async def job_result(request: Request, job_id: str, format: Literal["csv", "parquet"] = "csv"):
    job = await _job(request, job_id)
    if job["status"] != "succeeded":
        raise AppError(409, "job_not_finished", f"job is {job['status']}", {"status": job["status"]})
    files = batch.JobFiles(request.app.state.settings.data_dir, job_id)
    name = f"{job['model']}-{job_id}"
    if format == "parquet":
        path = await run_in_threadpool(batch.result_parquet, files, job["total_chunks"])
        return FileResponse(path, media_type="application/vnd.apache.parquet", filename=f"{name}.parquet")
    return StreamingResponse(batch.iter_result_csv(files, job["total_chunks"]), media_type="text/csv",
                             headers={"content-disposition": f'attachment; filename="{name}.csv"'})


# -- admin: quality, drift, training -----------------------------------------------------------------
@admin.get("/models/{model}/quality", summary="Per-version quality and the A/B verdict with sample sizes")
async def model_quality(request: Request, model: ModelName):
    return await quality.quality_report(request.app.state.engine, model)


@admin.get("/models/{model}/drift", summary="Latest PSI per feature against the training baseline")
async def model_drift(request: Request, model: ModelName):
    rows = await drift.latest_drift(request.app.state.engine, model)
    return {"model": model, "versions": rows, "alert": any(r["alert"] for r in rows),
            "threshold": request.app.state.settings.drift_psi_alert}


class TrainRequest(BaseModel):
    since_s: int | None = Field(default=None, ge=1, description="Only labels of predictions this recent.")
    force: bool = Field(default=False, description="Register even if worse than the current version.")


@admin.post("/models/{model}/train", status_code=202, summary="Queue a training run")
async def train_model(request: Request, model: ModelName, body: TrainRequest | None = None):
    body = body or TrainRequest()
    result = await run_in_threadpool(request.app.state.celery.send_task, "pipeline.train", args=[model],
                                     kwargs={"since_s": body.since_s, "force": body.force})
    return {"task_id": result.id, "model": model}


@admin.get("/models/{model}/training", summary="Recent training runs with their reports")
async def training_runs(request: Request, model: ModelName, limit: int = Query(10, ge=1, le=100)):
    runs = await fetch_all(request.app.state.engine, """
        SELECT id, model, status, version, report, created_at FROM pipeline.training_runs
        WHERE model = :model ORDER BY created_at DESC LIMIT :limit""", model=model, limit=limit)
    return {"model": model, "runs": runs}


async def refresh_gauges(engine) -> None:
    """Export the latest stored quality and drift as Prometheus gauges of the control app."""
    from .metrics import export_drift, export_quality

    export_quality(await quality.latest_quality(engine))
    export_drift(await drift.latest_drift(engine))


async def gauge_loop(engine, every_s: float = 15.0) -> None:
    while True:
        try:
            await refresh_gauges(engine)
        except Exception as exc:  # noqa: BLE001 - the database may be down; the next round tries again
            log.debug("gauge refresh failed: %s", exc)
        await asyncio.sleep(every_s)


# -- data subjects (docs/privacy.md): internal, never routed by the gateway ------------------------
internal = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False,
                     dependencies=[Depends(require_internal)])


@internal.get("/subjects/{principal}", summary="Predictions, feedback and jobs of a principal")
async def subject_export(request: Request, principal: str):
    from .subjects import export_subject

    return await export_subject(request.app.state.engine, principal)


@internal.delete("/subjects/{principal}", summary="Erase a principal's predictions, feedback and jobs")
async def subject_erase(request: Request, principal: str):
    from .subjects import erase_subject

    return await erase_subject(request.app.state.engine, principal, request.app.state.settings.data_dir)
