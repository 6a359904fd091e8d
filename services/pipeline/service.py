"""The batch job API's domain logic, framework-free: who may see which job, quotas, idempotent
submission, the checks made before a job is accepted, results and data-subject exports.

Ownership: a job belongs to the principal that submitted it (the gateway's X-Principal). Another
caller's job is "not found" (404, never 403, so ids cannot be probed); an admin sees every job,
and each look at another's job is audited. Server-side input paths inside another caller's job
directory are "not found" too.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from services.chassis.errors import AppError
from services.model.client import AsyncModelClient, ModelUnavailable

from . import batch, store
from .settings import PipelineSettings

log = logging.getLogger("aistack.pipeline.jobs")
audit_log = logging.getLogger("aistack.audit")

# Idempotency-Key: the IETF httpapi draft's header, at most this long (Stripe allows 255).
IDEMPOTENCY_KEY_MAX = 255
Audit = Callable[[str, str, str, str], Awaitable[Any]]
Send = Callable[..., Any]


@dataclass(frozen=True)
class Caller:
    """Who is asking, as the gateway forwards it: the principal (a user id or `apikey:<id>`), its
    role, and the owning user (the user behind an API key; the user itself otherwise)."""
    principal: str
    role: str = ""
    owner: str | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def scope(self) -> str | None:
        """The principal whose jobs this caller may name; None: every job (an admin)."""
        return None if self.admin else self.principal


@dataclass
class Submission:
    model: str
    version: str | None
    input_path: Path
    fmt: str
    chunk_rows: int | None
    batch_rows: int | None
    uploaded: bool
    input_bytes: int
    digest: str  # the request's fingerprint for Idempotency-Key


def fingerprint(*parts: Any) -> str:
    """sha256 of the request's canonical form: same key + same fingerprint -> the same job."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not key.isascii() or not key.isprintable():
        raise AppError(400, "invalid_idempotency_key", f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} "
                       "printable ASCII characters")
    return key


def job_view(job: dict) -> dict[str, Any]:
    """The public shape of a job (no server paths)."""
    total = job.get("total_chunks")
    done = int(job.get("done_chunks") or 0)
    return {
        "id": job["id"], "kind": job["kind"], "status": job["status"], "model": job["model"],
        "version": job["resolved_version"] or job["version"], "requested_version": job["version"],
        "input_format": job["input_format"],
        "progress": {"done_chunks": done, "total_chunks": total,
                     "done_rows": int(job.get("done_rows") or 0), "total_rows": job.get("total_rows"),
                     "fraction": (done / total) if total else (1.0 if job["status"] == "succeeded" else 0.0)},
        "chunk_rows": job["chunk_rows"], "batch_rows": job["batch_rows"], "error": job.get("error"),
        "created_at": job["created_at"], "started_at": job["started_at"], "finished_at": job["finished_at"],
    }


def not_found(job_id: str) -> AppError:
    return AppError(404, "job_not_found", f"no job '{job_id}'")


class JobService:
    def __init__(self, settings: PipelineSettings, engine: AsyncEngine, send: Send,
                 models: AsyncModelClient | None = None, audit: Audit | None = None):
        self.settings, self.engine, self.send, self.models, self.audit = settings, engine, send, models, audit

    @property
    def limits(self) -> batch.InputLimits:
        return batch.InputLimits(self.settings.job_max_rows, self.settings.job_max_bytes)

    # -- reading -------------------------------------------------------------------------------
    async def _audited(self, caller: Caller, action: str, job: dict) -> None:
        if caller.admin and job.get("principal") != caller.principal:
            audit_log.info("admin access to another principal's job",
                           extra={"actor": caller.principal, "action": action, "job": job["id"]})
            if self.audit is not None:
                await self.audit(caller.principal, action, job["id"], "admin")

    async def get(self, caller: Caller, job_id: str, action: str = "job.read") -> dict:
        job = await store.get_job(self.engine, job_id, caller.scope)
        if job is None:
            raise not_found(job_id)
        await self._audited(caller, action, job)
        return job

    async def list(self, caller: Caller, limit: int) -> list[dict]:
        jobs = await store.list_jobs(self.engine, limit, caller.scope)
        if caller.admin and any(j.get("principal") != caller.principal for j in jobs):
            audit_log.info("admin listed every principal's jobs", extra={"actor": caller.principal})
            if self.audit is not None:
                await self.audit(caller.principal, "job.list_all", "", "admin")
        return jobs

    async def cancel(self, caller: Caller, job_id: str) -> dict:
        job = await self.get(caller, job_id, "job.cancel")
        if job["status"] in store.FINAL or not await store.cancel_job(self.engine, job_id):
            job = await store.get_job(self.engine, job_id)
            raise AppError(409, "job_finished", f"job is already {job['status']}", {"status": job["status"]})
        return await store.get_job(self.engine, job_id)

    async def result(self, caller: Caller, job_id: str) -> tuple[dict, batch.JobFiles]:
        job = await self.get(caller, job_id, "job.download")
        if job["status"] != "succeeded":
            raise AppError(409, "job_not_finished", f"job is {job['status']}", {"status": job["status"]})
        return job, batch.JobFiles(self.settings.data_dir, job_id)

    # -- submitting ----------------------------------------------------------------------------
    async def server_input(self, caller: Caller, path: str) -> Path:
        """A server-side input the caller may read: inside the data dir, and not inside another
        caller's job directory (which answers like a file that does not exist)."""
        resolved = batch.resolve_server_path(self.settings.data_dir, path)
        owner_job = batch.job_of_path(self.settings.data_dir, resolved)
        if owner_job is not None:
            job = await store.get_job(self.engine, owner_job, caller.scope)
            if job is None:
                raise AppError(404, "input_not_found", f"no input file {path!r} in the pipeline data dir")
            await self._audited(caller, "job.read_input", job)
        return resolved

    async def check_quota(self, caller: Caller) -> None:
        """Before an upload is read: a caller at its concurrent-jobs limit uploads nothing (the
        count is made again, atomically, when the job is created)."""
        active = await store.active_jobs(self.engine, caller.principal)
        if active >= self.settings.max_active_jobs:
            raise store.over_quota(active, self.settings.max_active_jobs)

    async def _model_metadata(self, model: str, version: str | None) -> dict | None:
        """The model's inputs for the header check; None when the model server cannot say now (the
        job is still accepted and checked again when it starts)."""
        if self.models is None:
            return None
        try:
            return await self.models.metadata(model, version)
        except ModelUnavailable as exc:
            log.warning("model server unavailable at submission; inputs checked when the job starts",
                        extra={"model": model, "error": exc.message})
            return None

    async def submit(self, caller: Caller, job_id: str, sub: Submission, idempotency_key: str | None) -> tuple[dict, bool]:
        """Check the input's header against the model, then create the job and queue it. Returns
        (job, created); a repeated Idempotency-Key returns the earlier job and queues nothing."""
        if sub.input_bytes > self.settings.max_upload_bytes:
            raise batch.too_large("bytes", sub.input_bytes, self.settings.max_upload_bytes)
        metadata = await self._model_metadata(sub.model, sub.version)
        header = await asyncio.to_thread(batch.read_header, sub.input_path, sub.fmt, self.limits)
        batch.check_columns(header, metadata, self.limits)
        values = {"id": job_id, "model": sub.model, "version": sub.version, "input_path": str(sub.input_path),
                  "input_format": sub.fmt, "chunk_rows": sub.chunk_rows or self.settings.chunk_rows,
                  "batch_rows": sub.batch_rows or self.settings.infer_batch_rows, "principal": caller.principal,
                  "owner": caller.owner, "input_bytes": sub.input_bytes, "uploaded": sub.uploaded}
        key = check_idempotency_key(idempotency_key)
        try:
            job, created = await store.create_job(
                self.engine, values, max_active=self.settings.max_active_jobs,
                idempotency=(key, sub.digest, self.settings.idempotency_ttl_s) if key else None)
        except store.IdempotencyConflict:
            raise AppError(422, "idempotency_key_reused", "this Idempotency-Key was used with a different "
                           "request; use a new key for a new job", {"key": key}) from None
        if created:
            await self._queue(job_id)
        return job, created

    async def _queue(self, job_id: str) -> None:
        """Queue the job's preparation. The job is already durable in Postgres: if the broker does
        not take the message in time, the reaper queues it later (docs/pipeline.md)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.send, "pipeline.prepare_job", args=[job_id]),
                                   self.settings.submit_queue_timeout_s)
        except Exception as exc:  # noqa: BLE001 - accepted work is never lost: the reaper has it
            log.warning("job accepted but not queued yet; the reaper will queue it",
                        extra={"job": job_id, "error": type(exc).__name__})

    def discard_upload(self, job_id: str) -> None:
        shutil.rmtree(batch.JobFiles(self.settings.data_dir, job_id).root, ignore_errors=True)
