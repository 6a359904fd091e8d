"""Routes of the pipeline's control app: the batch job API (public, through the gateway) and the
model quality / drift / training admin API. Routes parse and answer; service.py and the modules
do the work."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.chassis.errors import AppError
from services.chassis.internal import require_internal
from services.model.client import ModelName, check_name

from . import batch, drift, quality, store
from .deps import CallerDep, CeleryDep, Engine, Jobs, Settings
from .schemas import SUBMIT_DOC, BatchJobRequest, TrainRequest
from .service import Submission, fingerprint, job_view

log = logging.getLogger("aistack.pipeline.api")
jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"])
admin = APIRouter(prefix="/admin", tags=["admin"])
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", include_in_schema=False)]


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


async def _save_upload(upload, target: Path, limit: int) -> tuple[int, str]:
    """Stream the upload to disk (at most `limit` bytes): its size and sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.upload")
    size, digest = 0, hashlib.sha256()
    with tmp.open("wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                out.close()
                tmp.unlink(missing_ok=True)
                raise batch.too_large("bytes", size, limit)
            digest.update(chunk)
            out.write(chunk)
    os.replace(tmp, target)
    return size, digest.hexdigest()


async def _multipart(request: Request, settings, job_id: str) -> Submission:
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
    path = batch.JobFiles(settings.data_dir, job_id).upload(fmt)
    size, file_hash = await _save_upload(upload, path, settings.max_upload_bytes)
    return Submission(str(model), version, path, fmt, chunk_rows, batch_rows, True, size,
                      fingerprint("multipart", file_hash, model, version, fmt, chunk_rows, batch_rows))


@jobs.post("/batch-inference", status_code=202, openapi_extra=SUBMIT_DOC,
           summary="Submit a batch inference job (multipart upload or a server-side path)")
async def submit_batch(request: Request, settings: Settings, service: Jobs, caller: CallerDep,
                       idempotency_key: IdempotencyKey = None):
    job_id = batch.new_job_id()
    if idempotency_key is None:  # a retry with a key must find its job, even at the limit
        await service.check_quota(caller)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        sub = await _multipart(request, settings, job_id)
    else:
        raw = await request.body()
        try:
            body = BatchJobRequest.model_validate_json(raw)
        except ValueError as exc:
            raise AppError(422, "validation_error", "body must be JSON {path, model, ...} or a multipart upload",
                           json.loads(exc.json()) if hasattr(exc, "json") else None) from None
        path = await service.server_input(caller, body.path)
        sub = Submission(body.model, body.version, path, batch.detect_format(path.name, body.format),
                         body.chunk_rows, body.batch_rows, False, path.stat().st_size,
                         fingerprint("json", body.model_dump(mode="json")))
    try:
        job, created = await service.submit(caller, job_id, sub, idempotency_key)
    except Exception:
        if sub.uploaded:
            service.discard_upload(job_id)
        raise
    if not created and sub.uploaded:
        service.discard_upload(job_id)  # a repeated submission: the earlier job has its own copy
    # A replay answers as the first submission did (202, the same job), marked as Stripe does.
    headers = {"Location": f"/v1/jobs/{job['id']}"} | ({} if created else {"Idempotent-Replayed": "true"})
    return JSONResponse(jsonable(job_view(job)), status_code=202, headers=headers)


def jsonable(view: dict) -> dict:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(view)


@jobs.get("", summary="Recent jobs: the caller's own (an admin's: everyone's, audited)")
async def list_jobs(service: Jobs, caller: CallerDep, limit: int = Query(50, ge=1, le=500)):
    return {"jobs": [job_view(j) for j in await service.list(caller, limit)]}


@jobs.get("/{job_id}", summary="A job's state and progress")
async def get_job(service: Jobs, caller: CallerDep, job_id: str):
    return job_view(await service.get(caller, job_id))


@jobs.post("/{job_id}/cancel", summary="Cancel a queued or running job")
async def cancel_job(service: Jobs, caller: CallerDep, job_id: str):
    return job_view(await service.cancel(caller, job_id))


@jobs.get("/{job_id}/result", summary="The result as one file, rows in input order")
async def job_result(service: Jobs, caller: CallerDep, job_id: str,
                     format: Literal["csv", "parquet"] = "csv"):
    job, files = await service.result(caller, job_id)
    name = f"{job['model']}-{job_id}"
    if format == "parquet":
        path = await run_in_threadpool(batch.result_parquet, files, job["total_chunks"])
        return FileResponse(path, media_type="application/vnd.apache.parquet", filename=f"{name}.parquet")
    return StreamingResponse(batch.iter_result_csv(files, job["total_chunks"]), media_type="text/csv",
                             headers={"content-disposition": f'attachment; filename="{name}.csv"'})


# -- admin: quality, drift, training -----------------------------------------------------------------
@admin.get("/models/{model}/quality", summary="Per-version quality and the A/B verdict with sample sizes")
async def model_quality(engine: Engine, model: ModelName):
    return await quality.quality_report(engine, model)


@admin.get("/models/{model}/drift", summary="Latest PSI per feature against the training baseline")
async def model_drift(engine: Engine, settings: Settings, model: ModelName):
    rows = await drift.latest_drift(engine, model)
    return {"model": model, "versions": rows, "alert": any(r["alert"] for r in rows),
            "threshold": settings.drift_psi_alert}


@admin.post("/models/{model}/train", status_code=202, summary="Queue a training run")
async def train_model(celery: CeleryDep, model: ModelName, body: TrainRequest | None = None):
    body = body or TrainRequest()
    result = await run_in_threadpool(celery.send_task, "pipeline.train", args=[model],
                                     kwargs={"since_s": body.since_s, "force": body.force})
    return {"task_id": result.id, "model": model}


@admin.get("/models/{model}/training", summary="Recent training runs with their reports")
async def training_runs(engine: Engine, model: ModelName, limit: int = Query(10, ge=1, le=100)):
    return {"model": model, "runs": await store.training_runs(engine, model, limit)}


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


@internal.get("/subjects/{principal}", summary="Predictions, feedback, jobs and job data of a principal")
async def subject_export(engine: Engine, settings: Settings, principal: str):
    from .subjects import export_subject

    return await export_subject(engine, principal, settings.data_dir)


@internal.delete("/subjects/{principal}", summary="Erase a principal's predictions, feedback, jobs and job files")
async def subject_erase(engine: Engine, settings: Settings, principal: str):
    from .subjects import erase_subject

    return await erase_subject(engine, principal, settings.data_dir)
