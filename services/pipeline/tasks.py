"""Celery tasks: thin wrappers over batch.py (files) and store.py (job state). Each is idempotent:
running it twice (a redelivery after a SIGKILL, a re-queue by the reaper) gives the same result
and no duplicates. Every job reaches a terminal state on its own (docs/pipeline.md):

- a chunk whose model calls keep failing retries with backoff, then fails the job at once with a
  stable code and the chunk's index;
- a database error while recording progress is retried (for PIPELINE_DB_RETRY_S), never dropped;
- a running chunk holds a lease in Postgres, renewed by a heartbeat; the reaper (beat) re-queues
  chunks whose lease expired ahead of new work (priority 0; new work is queued at DEFAULT_PRIORITY).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from celery import shared_task
from sqlalchemy.exc import DBAPIError

from services.chassis.errors import AppError
from services.model.client import ModelClient, ModelUnavailable

from . import batch, store
from .db import run_with_engine

log = logging.getLogger("aistack.pipeline.tasks")
T = TypeVar("T")
DB_ERRORS = (DBAPIError, OSError, TimeoutError)
RECOVERY_PRIORITY = 0  # Redis: 0 is served first (kombu's priority steps)


def _settings():
    from celery import current_app

    return current_app.conf.aistack_settings


def _db_once(fn):
    return run_with_engine(_settings().require("database_url"), fn)


def _db(fn: Callable, what: str = "database call") -> T:
    """Run a database call, retrying connection errors and timeouts with backoff for db_retry_s:
    progress of a chunk that is already scored is never dropped because Postgres paused."""
    deadline = time.monotonic() + _settings().db_retry_s
    delay = 0.5
    while True:
        try:
            return _db_once(fn)
        except DB_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable, retrying", extra={"what": what, "error": type(exc).__name__,
                                                                 "retry_in_s": delay})
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


_clients: dict[tuple, ModelClient] = {}


def _client(settings) -> ModelClient:
    """This process's one model client, kept open: a new httpx.Client per task built an SSL context
    and a connection each time (5% of a batch job). Per pid: a forked child never shares sockets."""
    key = (os.getpid(), settings.model_url, settings.http_timeout_s, settings.internal_token)
    if key not in _clients:
        _clients[key] = ModelClient(settings.model_url, settings.http_timeout_s,
                                    internal_token=settings.internal_token)
    return _clients[key]


def _backoff(retries: int) -> float:
    return float(min(2 ** (retries + 1), 30))


def _error(exc: AppError, **extra) -> dict:
    return {"code": exc.code, "message": exc.message, "details": exc.details, **extra}


def _fail(job_id: str, error: dict) -> None:
    if _db(lambda e: store.fail_job(e, job_id, error), "fail job"):
        log.warning("job failed", extra={"job": job_id, "code": error["code"], "chunk": error.get("chunk")})


def _limits(settings) -> batch.InputLimits:
    return batch.InputLimits(settings.job_max_rows, settings.job_max_bytes)


@shared_task(name="pipeline.score_rows", bind=True, max_retries=3, default_retry_delay=2)
def score_rows(self, model: str, rows: list[dict], version: str | None = None) -> dict:
    """Score rows on the model server in one v2 request."""
    try:
        client = _client(_settings())
        meta = client.metadata(model, version)
        outputs = client.infer_rows(model, rows, meta["parameters"]["version"])
    except ModelUnavailable as exc:
        raise self.retry(exc=exc) from None
    return {"model": model, "version": meta["parameters"]["version"], "outputs": outputs}


# -- batch inference -----------------------------------------------------------------------------
def _unavailable(exc: ModelUnavailable, attempts: int, chunk: int | None = None) -> dict:
    where = f"chunk {chunk}" if chunk is not None else "the job's start"
    return {"code": "model_unavailable", "chunk": chunk, "details": {"attempts": attempts, "cause": exc.code},
            "message": f"the model server did not answer for {where} after {attempts} attempts "
                       f"({exc.message}); submit the job again when the model server is back"}


def _internal(job_id: str, exc: Exception, chunk: int | None = None) -> dict:
    log.exception("job step failed unexpectedly", extra={"job": job_id, "chunk": chunk})
    return {"code": "internal_error", "chunk": chunk, "details": None,
            "message": "the pipeline could not process this job; the operators have the details in the logs"}


@shared_task(name="pipeline.prepare_job", bind=True, max_retries=None, ignore_result=True)
def prepare_job(self, job_id: str) -> dict:
    """Resolve the model version, split the input into typed chunks, queue one task per chunk."""
    settings = _settings()
    job = _db(lambda e: store.get_job(e, job_id), "read job")
    if job is None or job["status"] in store.FINAL:
        return {"job": job_id, "skipped": True}
    files = batch.JobFiles(settings.data_dir, job_id)
    try:
        meta = _client(settings).metadata(job["model"], job["resolved_version"] or job["version"])
        version = meta["parameters"]["version"]
        total_chunks, total_rows = batch.split_input(files, Path(job["input_path"]), job["input_format"],
                                                     job["chunk_rows"], meta, _limits(settings))
    except ModelUnavailable as exc:
        if self.request.retries >= settings.chunk_max_retries:
            _fail(job_id, _unavailable(exc, self.request.retries + 1))
            return {"job": job_id, "failed": True}
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from None
    except AppError as exc:
        _fail(job_id, _error(exc))
        return {"job": job_id, "failed": True}
    except Exception as exc:  # noqa: BLE001 - a job never stays queued because of a surprise
        _fail(job_id, _internal(job_id, exc))
        return {"job": job_id, "failed": True}

    async def start(engine):
        await store.mark_running(engine, job_id, total_chunks, total_rows, version)
        return await store.unfinished_work(engine, job_id)

    pending = _db(start, "start job")
    missing = pending[0][2] if pending else []
    for idx in missing:
        score_chunk.delay(job_id, idx)
    log.info("job started", extra={"job": job_id, "chunks": total_chunks, "rows": total_rows})
    return {"job": job_id, "chunks": total_chunks, "rows": total_rows, "queued": len(missing)}


class Heartbeat:
    """Renews a chunk's lease every heartbeat_s from a thread while the chunk is scored."""

    def __init__(self, settings, job_id: str, idx: int, holder: str):
        self.settings, self.job_id, self.idx, self.holder = settings, job_id, idx, holder
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{job_id}-{idx}")

    def _run(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_s):
            try:
                _db_once(lambda e: store.heartbeat(e, self.job_id, self.idx, self.holder, self.settings.lease_s))
            except Exception as exc:  # noqa: BLE001 - a missed beat only shortens the lease
                log.warning("lease heartbeat failed", extra={"job": self.job_id, "chunk": self.idx,
                                                             "error": type(exc).__name__})

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


@shared_task(name="pipeline.score_chunk", bind=True, max_retries=None, ignore_result=True)
def score_chunk(self, job_id: str, idx: int) -> dict:
    """Score one chunk into its own part under a lease, count it, and finish the job if it was the
    last (one transaction)."""
    settings = _settings()
    job = _db(lambda e: store.get_job(e, job_id), "read job")
    if job is None or job["status"] != "running":
        return {"job": job_id, "chunk": idx, "skipped": job["status"] if job else "missing"}
    if _db(lambda e: store.chunk_done(e, job_id, idx), "read chunk"):
        return {"job": job_id, "chunk": idx, "skipped": "done"}
    holder = self.request.id or f"local-{time.monotonic_ns()}"
    if not _db(lambda e: store.claim_lease(e, job_id, idx, holder, settings.lease_s), "claim lease"):
        return {"job": job_id, "chunk": idx, "skipped": "leased"}
    files = batch.JobFiles(settings.data_dir, job_id)
    try:
        client = _client(settings)
        with Heartbeat(settings, job_id, idx, holder):
            # A part that exists is done (the worker died before counting it): count it, score nothing.
            meta = {} if files.part(idx).is_file() else client.metadata(job["model"], job["resolved_version"])
            rows = batch.score_chunk(files, idx, client, meta, job["batch_rows"])
    except ModelUnavailable as exc:
        if self.request.retries >= settings.chunk_max_retries:
            _fail(job_id, _unavailable(exc, self.request.retries + 1, idx))
            return {"job": job_id, "chunk": idx, "failed": True}
        countdown = _backoff(self.request.retries)
        # Keep the lease through the wait, so the reaper leaves this chunk to its retry.
        _db(lambda e: store.heartbeat(e, job_id, idx, holder, countdown + settings.lease_s), "extend lease")
        log.warning("model server unavailable, chunk retries", extra={
            "job": job_id, "chunk": idx, "retry": self.request.retries + 1, "in_s": countdown})
        raise self.retry(exc=exc, countdown=countdown) from None
    except AppError as exc:
        _fail(job_id, _error(exc, chunk=idx))
        return {"job": job_id, "chunk": idx, "failed": True}
    except Exception as exc:  # noqa: BLE001 - a job never stays running because of a surprise
        _fail(job_id, _internal(job_id, exc, idx))
        return {"job": job_id, "chunk": idx, "failed": True}
    finished = _db(lambda e: store.record_chunk(e, job_id, idx, rows), "record chunk")
    if finished:
        log.info("job succeeded", extra={"job": job_id})
    return {"job": job_id, "chunk": idx, "rows": rows, "finished": finished}


@shared_task(name="pipeline.reap")
def reap() -> dict:
    """The reaper (beat): re-queue, ahead of new work, chunks whose lease expired (their worker
    died), running work nobody holds and queued jobs never started (see store.reap)."""
    work = _db(lambda e: store.reap(e, _settings().stale_s), "reap")
    for job_id in work["queued"]:
        prepare_job.apply_async(args=[job_id], priority=RECOVERY_PRIORITY)
    for job_id, idx in work["chunks"]:
        score_chunk.apply_async(args=[job_id, idx], priority=RECOVERY_PRIORITY)
    if work["queued"] or work["chunks"]:
        log.info("reaper re-queued work", extra={"chunks": len(work["chunks"]), "jobs": len(work["queued"])})
    return {"chunks": len(work["chunks"]), "jobs": len(work["queued"])}


@shared_task(name="pipeline.recover")
def recover() -> dict:
    """At worker start: the reaper's sweep at once, instead of waiting for the next beat."""
    return reap()
