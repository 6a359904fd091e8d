"""Celery tasks: thin wrappers over the framework-free modules. Each is idempotent: running it twice
(a redelivery after a SIGKILL, a duplicate from the recovery sweep) gives the same result and no
duplicates."""
from __future__ import annotations

import logging

import httpx
from celery import shared_task

from services.chassis.errors import AppError
from services.model.client import decode_rows, encode_rows

from . import batch
from .db import run_with_engine

log = logging.getLogger("aistack.pipeline.tasks")


def _settings():
    from celery import current_app

    return current_app.conf.aistack_settings


def _db(fn):
    return run_with_engine(_settings().require("database_url"), fn)


@shared_task(name="pipeline.score_rows", bind=True, max_retries=3, default_retry_delay=2)
def score_rows(self, model: str, rows: list[dict], version: str | None = None) -> dict:
    """Score rows on the model server in one v2 request."""
    settings = _settings()
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    try:
        with httpx.Client(base_url=settings.model_url, timeout=settings.http_timeout_s) as http:
            meta = http.get(path).raise_for_status().json()
            resolved = meta["parameters"]["version"]
            response = http.post(f"/v2/models/{model}/versions/{resolved}/infer",
                                 json=encode_rows(meta, rows)).raise_for_status().json()
    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
            raise
        raise self.retry(exc=exc)
    return {"model": model, "version": resolved, "outputs": decode_rows(response)}


# -- batch inference -----------------------------------------------------------------------------
def _error(exc: Exception) -> dict:
    if isinstance(exc, AppError):
        return {"code": exc.code, "message": exc.message, "details": exc.details}
    return {"code": "input_error", "message": f"{type(exc).__name__}: {exc}"[:500]}


@shared_task(name="pipeline.prepare_job", bind=True, max_retries=5, default_retry_delay=5)
def prepare_job(self, job_id: str) -> dict:
    """Resolve the model version, split the input into chunks, queue one task per chunk."""
    settings = _settings()
    job = _db(lambda e: batch.get_job(e, job_id))
    if job is None or job["status"] in batch.FINAL:
        return {"job": job_id, "skipped": True}
    files = batch.JobFiles(settings.data_dir, job_id)
    scorer = batch.Scorer(settings.model_url, settings.http_timeout_s)
    try:
        version = job["resolved_version"] or scorer.metadata(job["model"], job["version"])["parameters"]["version"]
        total_chunks, total_rows = batch.split_input(files, batch.Path(job["input_path"]), job["input_format"],
                                                     job["chunk_rows"])
    except batch.ModelUnavailable as exc:
        raise self.retry(exc=exc)
    except (AppError, OSError, ValueError) as exc:  # pyarrow's parse errors are ValueErrors
        error = _error(exc)
        _db(lambda e: batch.fail_job(e, job_id, error))
        return {"job": job_id, "failed": True}
    finally:
        scorer.close()

    async def start(engine):
        await batch.mark_running(engine, job_id, total_chunks, total_rows, version)
        await batch.finish_if_complete(engine, job_id)  # an empty input is done at once
        return [w for w in await batch.unfinished_work(engine) if w[0] == job_id]

    pending = _db(start)
    missing = pending[0][2] if pending else []
    for idx in missing:
        score_chunk.delay(job_id, idx)
    return {"job": job_id, "chunks": total_chunks, "rows": total_rows, "queued": len(missing)}


@shared_task(name="pipeline.score_chunk", bind=True, max_retries=8, default_retry_delay=3)
def score_chunk(self, job_id: str, idx: int) -> dict:
    """Score one chunk into its own part, count it, and finish the job if it was the last."""
    settings = _settings()
    job = _db(lambda e: batch.get_job(e, job_id))
    if job is None or job["status"] != "running":
        return {"job": job_id, "chunk": idx, "skipped": job["status"] if job else "missing"}
    files = batch.JobFiles(settings.data_dir, job_id)
    scorer = batch.Scorer(settings.model_url, settings.http_timeout_s)
    try:
        # A part that exists is done (the worker died before counting it): count it, score nothing.
        meta = {} if files.part(idx).is_file() else scorer.metadata(job["model"], job["resolved_version"])
        rows = batch.score_chunk(files, idx, scorer, meta, job["batch_rows"])
    except batch.ModelUnavailable as exc:
        raise self.retry(exc=exc)
    except (AppError, OSError, ValueError) as exc:
        error = {**_error(exc), "chunk": idx}
        _db(lambda e: batch.fail_job(e, job_id, error))
        return {"job": job_id, "chunk": idx, "failed": True}
    finally:
        scorer.close()
    finished = _db(lambda e: batch.record_chunk(e, job_id, idx, rows))
    return {"job": job_id, "chunk": idx, "rows": rows, "finished": finished}


@shared_task(name="pipeline.recover")
def recover() -> dict:
    """Re-queue the unfinished work of every queued or running job (idempotent: duplicates skip)."""
    async def sweep(engine):
        work = await batch.unfinished_work(engine)
        for job_id, status, missing in work:
            if status == "running" and not missing:
                await batch.finish_if_complete(engine, job_id)
        return work

    work = _db(sweep)
    requeued = 0
    for job_id, status, missing in work:
        if status == "queued":
            prepare_job.delay(job_id)
            requeued += 1
        for idx in missing:
            score_chunk.delay(job_id, idx)
            requeued += 1
    if requeued:
        log.info("recovery sweep re-queued work", extra={"tasks": requeued, "jobs": len(work)})
    return {"jobs": len(work), "tasks": requeued}
