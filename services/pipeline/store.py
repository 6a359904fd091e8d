"""Job state in Postgres (SQLAlchemy Core over services/pipeline/tables.py): jobs, the chunks
counted done, chunk leases with heartbeats, idempotency keys.

State machine (docs/pipeline.md): queued -> running -> succeeded | failed | cancelled, and
queued -> failed | cancelled. Terminal states never change again. The last chunk's count and the
switch to `succeeded` commit in one transaction under the job row's lock, so a poll never reads
"all chunks done" next to `running`.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import delete, exists, func, insert, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .tables import chunk_leases, idempotency_keys, job_chunks, jobs
from .tables import training_runs as runs

FINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")

_done_chunks = (select(func.count()).select_from(job_chunks).where(job_chunks.c.job_id == jobs.c.id)
                .scalar_subquery().label("done_chunks"))
_done_rows = (select(func.coalesce(func.sum(job_chunks.c.rows), 0)).where(job_chunks.c.job_id == jobs.c.id)
              .scalar_subquery().label("done_rows"))
_JOB = select(jobs, _done_chunks, _done_rows)


def _row(r) -> dict | None:
    return dict(r._mapping) if r is not None else None


def _visible(principal: str | None):
    """Jobs a caller may name: its own (principal None: every job, for admins and workers)."""
    return literal(True) if principal is None else jobs.c.principal == principal


class IdempotencyConflict(Exception):
    """The key was used before with another request body."""

    def __init__(self, job_id: str):
        self.job_id = job_id


async def get_job(engine: AsyncEngine, job_id: str, principal: str | None = None) -> dict | None:
    async with engine.connect() as conn:
        return _row((await conn.execute(_JOB.where(jobs.c.id == job_id, _visible(principal)))).first())


async def list_jobs(engine: AsyncEngine, limit: int = 50, principal: str | None = None) -> list[dict]:
    async with engine.connect() as conn:
        result = await conn.execute(_JOB.where(_visible(principal)).order_by(jobs.c.created_at.desc()).limit(limit))
        return [dict(r._mapping) for r in result]


async def active_jobs(engine: AsyncEngine, principal: str) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(jobs).where(
            jobs.c.principal == principal, jobs.c.status.in_(ACTIVE)))).scalar_one()


def over_quota(active: int, max_active: int):
    from services.chassis.errors import AppError

    return AppError(429, "quota_concurrent_jobs", f"{active} jobs of yours are queued or running; the limit "
                    f"'concurrent_jobs' is {max_active}: wait for one to finish",
                    {"limit": "concurrent_jobs", "max": max_active, "active": active},
                    headers={"Retry-After": "30"})


async def create_job(engine: AsyncEngine, values: dict[str, Any], *, max_active: int,
                     idempotency: tuple[str, str, float] | None = None) -> tuple[dict, bool]:
    """Insert a queued job: (job, created). Under a per-principal advisory lock: the concurrent-jobs
    quota is counted and the idempotency key claimed atomically with the insert. With a key already
    used for the same request the earlier job comes back (created False); for another request,
    IdempotencyConflict."""
    principal = values.get("principal") or ""
    async with engine.begin() as conn:
        await conn.execute(select(func.pg_advisory_xact_lock(func.hashtext("pipeline.jobs:" + principal))))
        if idempotency is not None:
            key, digest, ttl_s = idempotency
            await conn.execute(delete(idempotency_keys).where(
                idempotency_keys.c.principal == principal, idempotency_keys.c.key == key,
                idempotency_keys.c.expires_at < func.now()))
            earlier = (await conn.execute(select(idempotency_keys).where(
                idempotency_keys.c.principal == principal, idempotency_keys.c.key == key))).first()
            if earlier is not None:
                if earlier.request_hash != digest:
                    raise IdempotencyConflict(earlier.job_id)
                job = _row((await conn.execute(_JOB.where(jobs.c.id == earlier.job_id))).first())
                if job is not None:
                    return job, False
        active = (await conn.execute(select(func.count()).select_from(jobs).where(
            jobs.c.principal == values.get("principal"), jobs.c.status.in_(ACTIVE)))).scalar_one()
        if active >= max_active:
            raise over_quota(active, max_active)
        await conn.execute(insert(jobs).values(status="queued", **values))
        if idempotency is not None:
            await conn.execute(insert(idempotency_keys).values(
                principal=principal, key=key, request_hash=digest, job_id=values["id"],
                expires_at=func.now() + dt.timedelta(seconds=ttl_s)))
        return _row((await conn.execute(_JOB.where(jobs.c.id == values["id"]))).first()), True


async def mark_running(engine: AsyncEngine, job_id: str, total_chunks: int, total_rows: int,
                       resolved_version: str) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE)).values(
            status="running", total_chunks=total_chunks, total_rows=total_rows, resolved_version=resolved_version,
            started_at=func.coalesce(jobs.c.started_at, func.now()), updated_at=func.now()))
        return bool(result.rowcount)


async def _finish_if_complete(conn: AsyncConnection, job_id: str) -> bool:
    done = select(func.count()).select_from(job_chunks).where(job_chunks.c.job_id == job_id).scalar_subquery()
    result = await conn.execute(update(jobs).where(
        jobs.c.id == job_id, jobs.c.status == "running", done >= jobs.c.total_chunks).values(
        status="succeeded", finished_at=func.now(), updated_at=func.now()))
    if result.rowcount:
        await conn.execute(delete(chunk_leases).where(chunk_leases.c.job_id == job_id))
    return bool(result.rowcount)


async def _lock(conn: AsyncConnection, job_id: str) -> str | None:
    return (await conn.execute(select(jobs.c.status).where(jobs.c.id == job_id).with_for_update())).scalar()


async def record_chunk(engine: AsyncEngine, job_id: str, idx: int, rows: int) -> bool:
    """Count a chunk done (once, however often it runs) and, when it was the last, mark the job
    succeeded, in one transaction under the job row's lock (two last chunks cannot both miss it)."""
    async with engine.begin() as conn:
        if await _lock(conn, job_id) != "running":
            return False
        await conn.execute(pg_insert(job_chunks).values(job_id=job_id, idx=idx, rows=rows).on_conflict_do_nothing())
        await conn.execute(delete(chunk_leases).where(chunk_leases.c.job_id == job_id, chunk_leases.c.idx == idx))
        await conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=func.now()))
        return await _finish_if_complete(conn, job_id)


async def finish_if_complete(engine: AsyncEngine, job_id: str) -> bool:
    async with engine.begin() as conn:
        await _lock(conn, job_id)
        return await _finish_if_complete(conn, job_id)


async def fail_job(engine: AsyncEngine, job_id: str, error: dict) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE)).values(
            status="failed", error=error, finished_at=func.now(), updated_at=func.now()))
        await conn.execute(delete(chunk_leases).where(chunk_leases.c.job_id == job_id))
        return bool(result.rowcount)


async def cancel_job(engine: AsyncEngine, job_id: str) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE)).values(
            status="cancelled", finished_at=func.now(), updated_at=func.now()))
        await conn.execute(delete(chunk_leases).where(chunk_leases.c.job_id == job_id))
        return bool(result.rowcount)


async def chunk_done(engine: AsyncEngine, job_id: str, idx: int) -> bool:
    async with engine.connect() as conn:
        return bool((await conn.execute(select(exists().where(
            job_chunks.c.job_id == job_id, job_chunks.c.idx == idx)))).scalar())


# -- leases ----------------------------------------------------------------------------------------
async def claim_lease(engine: AsyncEngine, job_id: str, idx: int, holder: str, lease_s: float) -> bool:
    """Take the chunk's lease unless another holder's lease is still live (that task is running)."""
    until = func.now() + dt.timedelta(seconds=lease_s)
    stmt = pg_insert(chunk_leases).values(job_id=job_id, idx=idx, worker=holder, leased_until=until)
    stmt = stmt.on_conflict_do_update(
        index_elements=[chunk_leases.c.job_id, chunk_leases.c.idx],
        set_={"worker": holder, "leased_until": until, "heartbeat_at": func.now(),
              "attempts": chunk_leases.c.attempts + 1},
        where=or_(chunk_leases.c.leased_until < func.now(), chunk_leases.c.worker == holder))
    async with engine.begin() as conn:
        return (await conn.execute(stmt.returning(chunk_leases.c.idx))).first() is not None


async def heartbeat(engine: AsyncEngine, job_id: str, idx: int, holder: str, lease_s: float) -> bool:
    """Extend a lease still held; False when it was lost (expired and taken) or the job ended."""
    async with engine.begin() as conn:
        result = await conn.execute(update(chunk_leases).where(
            chunk_leases.c.job_id == job_id, chunk_leases.c.idx == idx, chunk_leases.c.worker == holder).values(
            leased_until=func.now() + dt.timedelta(seconds=lease_s), heartbeat_at=func.now()))
        return bool(result.rowcount)


async def release_lease(engine: AsyncEngine, job_id: str, idx: int, holder: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(chunk_leases).where(
            chunk_leases.c.job_id == job_id, chunk_leases.c.idx == idx, chunk_leases.c.worker == holder))


async def reap(engine: AsyncEngine, stale_s: float) -> dict[str, list]:
    """What the reaper re-queues: chunks of running jobs whose lease expired (their worker died),
    chunks of running jobs without progress for `stale_s` that nobody holds (a message lost with its
    worker before it started), and queued jobs not started for `stale_s` (a lost or unsent prepare).
    Also drops expired idempotency keys."""
    stale = func.now() - dt.timedelta(seconds=stale_s)
    async with engine.begin() as conn:
        await conn.execute(delete(idempotency_keys).where(idempotency_keys.c.expires_at < func.now()))
        expired = (await conn.execute(select(chunk_leases.c.job_id, chunk_leases.c.idx).join(
            jobs, jobs.c.id == chunk_leases.c.job_id).where(
            jobs.c.status == "running", chunk_leases.c.leased_until < func.now()))).all()
        idle = (await conn.execute(select(jobs.c.id, jobs.c.total_chunks).where(
            jobs.c.status == "running", jobs.c.updated_at < stale,
            ~exists().where(chunk_leases.c.job_id == jobs.c.id, chunk_leases.c.leased_until >= func.now())))).all()
        missing = []
        for job_id, total in idle:
            done = set((await conn.execute(select(job_chunks.c.idx).where(job_chunks.c.job_id == job_id))).scalars())
            missing.extend((job_id, i) for i in range(total or 0) if i not in done)
            # Touch the job so the next round waits another stale_s before re-queueing it again.
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=func.now()))
        queued = (await conn.execute(select(jobs.c.id).where(jobs.c.status == "queued",
                                                             jobs.c.updated_at < stale))).scalars().all()
        if queued:
            await conn.execute(update(jobs).where(jobs.c.id.in_(queued)).values(updated_at=func.now()))
        for job_id, idx in expired:
            # Free for whoever takes the re-queued chunk; the touch keeps the idle rule off it.
            await conn.execute(delete(chunk_leases).where(chunk_leases.c.job_id == job_id,
                                                          chunk_leases.c.idx == idx))
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=func.now()))
    chunks = sorted({(j, i) for j, i in expired} | set(missing))
    return {"chunks": chunks, "queued": list(queued)}


async def unfinished_work(engine: AsyncEngine, job_id: str | None = None) -> list[tuple[str, str, list[int]]]:
    """(job id, status, chunk indexes not done) of queued or running jobs."""
    async with engine.connect() as conn:
        stmt = select(jobs.c.id, jobs.c.status, jobs.c.total_chunks).where(jobs.c.status.in_(ACTIVE))
        if job_id is not None:
            stmt = stmt.where(jobs.c.id == job_id)
        rows = (await conn.execute(stmt)).all()
        out = []
        for jid, status, total in rows:
            done = set((await conn.execute(select(job_chunks.c.idx).where(job_chunks.c.job_id == jid))).scalars())
            out.append((jid, status, [i for i in range(total or 0) if i not in done]))
        return out


# -- data subjects -----------------------------------------------------------------------------------
def _of_subject(principal: str):
    return or_(jobs.c.principal == principal, jobs.c.owner == principal)


async def subject_jobs(engine: AsyncEngine, principal: str) -> list[dict]:
    """Jobs submitted by the principal, or by API keys it owns (X-Principal-Owner)."""
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(
            _JOB.where(_of_subject(principal)).order_by(jobs.c.created_at))]


async def erase_subject_jobs(conn: AsyncConnection, principal: str) -> list[dict]:
    """Delete the principal's jobs (leases, chunks and keys cascade); their ids and input paths."""
    result = await conn.execute(delete(jobs).where(_of_subject(principal)).returning(
        jobs.c.id, jobs.c.input_path, jobs.c.uploaded))
    return [dict(r._mapping) for r in result]



# -- training runs (read by the admin API) ---------------------------------------------------------
async def training_runs(engine: AsyncEngine, model: str, limit: int) -> list[dict]:
    async with engine.connect() as conn:
        result = await conn.execute(select(runs.c.id, runs.c.model, runs.c.status, runs.c.version, runs.c.report,
                                           runs.c.created_at).where(runs.c.model == model)
                                    .order_by(runs.c.created_at.desc()).limit(limit))
        return [dict(r._mapping) for r in result]
