"""Batch inference, framework-free: split an input into chunks, score each chunk on the model server
in large batches, write each chunk's output part atomically, assemble the parts into one result.

Layout under <data_dir>/jobs/<id>/:
  input.csv|input.parquet   the upload (a server-side input stays where it is)
  chunks/in-00000.parquet   chunk inputs with a `_row` column (0-based row number of the input)
  chunks.json               written last by the split: {"total_chunks", "total_rows"}
  parts/part-00000.parquet  chunk outputs: `_row`, the input columns, the model's outputs
Every file is written to a temporary name and renamed, so a reader (or a task re-run after a
SIGKILL) sees a whole file or none: a chunk whose part exists is done and is never scored again.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.chassis.errors import AppError
from services.model.client import MissingInputs

from .db import execute, fetch_all, fetch_one

FINAL = ("succeeded", "failed", "cancelled")
FORMATS = ("csv", "parquet")
ROW = "_row"


# -- files ---------------------------------------------------------------------------------------
class JobFiles:
    def __init__(self, data_dir: str | Path, job_id: str):
        self.root = Path(data_dir) / "jobs" / job_id
        self.chunks = self.root / "chunks"
        self.parts = self.root / "parts"
        self.marker = self.root / "chunks.json"

    def chunk(self, idx: int) -> Path:
        return self.chunks / f"in-{idx:05d}.parquet"

    def part(self, idx: int) -> Path:
        return self.parts / f"part-{idx:05d}.parquet"

    def upload(self, fmt: str) -> Path:
        return self.root / f"input.{fmt}"


def new_job_id() -> str:
    return uuid.uuid4().hex


def detect_format(name: str, given: str | None = None) -> str:
    fmt = (given or "").lower() or ("parquet" if name.lower().endswith((".parquet", ".pq")) else
                                    "csv" if name.lower().endswith((".csv", ".csv.gz")) else "")
    if fmt not in FORMATS:
        raise AppError(415, "unsupported_format", f"input must be CSV or Parquet (got {name!r})",
                       {"formats": list(FORMATS)})
    return fmt


def resolve_server_path(data_dir: str | Path, path: str) -> Path:
    """A server-side input must lie inside the data dir (no `..`, no symlink out of it)."""
    root = Path(data_dir).resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise AppError(403, "path_not_allowed", "server-side inputs must be inside the pipeline data dir",
                       {"path": path})
    if not resolved.is_file():
        raise AppError(404, "input_not_found", f"no input file {path!r} in the pipeline data dir")
    return resolved


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _input_batches(path: Path, fmt: str) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=65_536)
        return
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=8 << 20))
    yield from reader


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    buf: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - size, batch.num_rows)
            buf.append(batch.slice(0, take))
            size += take
            batch = batch.slice(take)
            if size == rows:
                yield pa.Table.from_batches(buf)
                buf, size = [], 0
    if size:
        yield pa.Table.from_batches(buf)


def split_input(files: JobFiles, input_path: Path, fmt: str, chunk_rows: int) -> tuple[int, int]:
    """Write chunk inputs; idempotent: once chunks.json exists the split is done and is reused."""
    if files.marker.is_file():
        done = json.loads(files.marker.read_text())
        return done["total_chunks"], done["total_rows"]
    total_chunks = total_rows = 0
    for idx, table in enumerate(_rechunk(_input_batches(input_path, fmt), chunk_rows)):
        rows = pa.array(np.arange(total_rows, total_rows + table.num_rows, dtype=np.int64))
        write_parquet_atomic(table.add_column(0, ROW, rows), files.chunk(idx))
        total_chunks, total_rows = idx + 1, total_rows + table.num_rows
    _atomic_write(files.marker, lambda tmp: tmp.write_text(
        json.dumps({"total_chunks": total_chunks, "total_rows": total_rows})))
    return total_chunks, total_rows


# -- scoring on the model server -----------------------------------------------------------------
def encode_columns(metadata: dict, table: pa.Table) -> dict:
    """The v2 request for a whole table, column by column (services.model.client.encode_rows does
    the same row by row; columnar is what makes a million rows cheap)."""
    missing, bad_rows = [], []
    inputs = []
    for spec in metadata["inputs"]:
        name, datatype = spec["name"], spec["datatype"]
        if name not in table.column_names:
            missing.append(name)
            continue
        col = table.column(name)
        if col.null_count:
            missing.append(name)
            nulls = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
            bad_rows.extend(int(i) for i in nulls[:20])
            continue
        try:
            if datatype.startswith("FP"):
                data = col.cast(pa.float64()).to_numpy()
            elif datatype.startswith(("INT", "UINT")):
                data = col.cast(pa.int64()).to_numpy()
            elif datatype == "BOOL":
                data = col.cast(pa.bool_()).to_numpy(zero_copy_only=False)
            else:
                data = col.cast(pa.string()).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise AppError(422, "invalid_feature", f"feature '{name}' must be {datatype}: {exc}",
                           {"feature": name}) from None
        inputs.append({"name": name, "datatype": datatype, "shape": [table.num_rows, *spec["shape"][1:]],
                       "data": data})
    if missing:
        raise MissingInputs(sorted(missing), sorted(set(bad_rows)))
    return {"inputs": inputs}


def decode_columns(response: dict) -> dict[str, np.ndarray]:
    """Output tensors as columns; a [n, k] output becomes columns name_0 .. name_{k-1}."""
    cols: dict[str, np.ndarray] = {}
    for out in response["outputs"]:
        arr = np.asarray(out["data"]).reshape(out["shape"])
        if arr.ndim == 1:
            cols[out["name"]] = arr
        else:
            flat = arr.reshape(arr.shape[0], -1)
            for j in range(flat.shape[1]):
                cols[f"{out['name']}_{j}"] = flat[:, j]
    return cols


class ModelUnavailable(Exception):
    """The model server failed (5xx / transport): worth a retry, unlike a 4xx."""


class Scorer:
    """Synchronous client of the model server's v2 protocol (a Celery task is synchronous)."""

    def __init__(self, model_url: str, timeout: float = 60.0):
        self.http = httpx.Client(base_url=model_url, timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ModelUnavailable(f"model server unreachable: {type(exc).__name__}") from exc
        if r.status_code >= 500:
            raise ModelUnavailable(f"model server answered {r.status_code}: {r.text[:200]}")
        if r.status_code >= 400:
            try:
                message = r.json().get("error")
            except ValueError:
                message = r.text
            code = "model_not_found" if r.status_code == 404 else "model_rejected_input"
            raise AppError(r.status_code if r.status_code in (404, 422) else 422, code, str(message)[:500])
        return r.json()

    def metadata(self, model: str, version: str | None = None) -> dict:
        return self._call("GET", f"/v2/models/{model}" + (f"/versions/{version}" if version else ""))

    def score(self, metadata: dict, table: pa.Table, batch_rows: int) -> pa.Table:
        """Outputs for every row of `table`, in order, batch_rows rows per request."""
        model, version = metadata["name"], metadata["parameters"]["version"]
        pieces: list[dict[str, np.ndarray]] = []
        for lo in range(0, table.num_rows, batch_rows):
            body = orjson.dumps(encode_columns(metadata, table.slice(lo, batch_rows)),
                                option=orjson.OPT_SERIALIZE_NUMPY)
            response = self._call("POST", f"/v2/models/{model}/versions/{version}/infer", content=body,
                                  headers={"content-type": "application/json"})
            pieces.append(decode_columns(response))
        if not pieces:
            return pa.table({})
        return pa.table({k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]})


def score_chunk(files: JobFiles, idx: int, scorer: Scorer, metadata: dict, batch_rows: int) -> int:
    """Score one chunk into its part; a part that exists already is kept as it is (idempotent)."""
    part = files.part(idx)
    if part.is_file():
        return pq.ParquetFile(part).metadata.num_rows
    table = pq.read_table(files.chunk(idx))
    outputs = scorer.score(metadata, table.drop_columns([ROW]), batch_rows)
    for name in outputs.column_names:
        col_name = name if name not in table.column_names else f"prediction_{name}"
        table = table.append_column(col_name, outputs.column(name))
    write_parquet_atomic(table, part)
    return table.num_rows


# -- results -------------------------------------------------------------------------------------
def iter_result_csv(files: JobFiles, total_chunks: int) -> Iterator[bytes]:
    """One CSV from the parts in chunk order, a part at a time (bounded memory)."""
    for idx in range(total_chunks):
        table = pq.read_table(files.part(idx))
        buf = io.BytesIO()
        pacsv.write_csv(table, buf, write_options=pacsv.WriteOptions(include_header=idx == 0))
        yield buf.getvalue()


def result_parquet(files: JobFiles, total_chunks: int) -> Path:
    """One Parquet file from the parts in chunk order, built once and kept."""
    target = files.root / "result.parquet"
    if target.is_file():
        return target

    def write(tmp: Path) -> None:
        writer = None
        try:
            for idx in range(total_chunks):
                table = pq.read_table(files.part(idx))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
            elif not tmp.exists():
                pq.write_table(pa.table({ROW: pa.array([], pa.int64())}), tmp)

    _atomic_write(target, write)
    return target


# -- job state in Postgres -----------------------------------------------------------------------
JOB_COLUMNS = ("id, kind, status, model, version, resolved_version, input_format, chunk_rows, batch_rows, "
               "total_chunks, total_rows, principal, error, created_at, started_at, finished_at, updated_at, "
               "input_path")


async def create_job(engine: AsyncEngine, *, job_id: str, model: str, version: str | None, input_path: Path,
                     input_format: str, chunk_rows: int, batch_rows: int, principal: str | None) -> dict:
    await execute(engine, """
        INSERT INTO pipeline.jobs (id, status, model, version, input_path, input_format, chunk_rows,
                                   batch_rows, principal)
        VALUES (:id, 'queued', :model, :version, :path, :fmt, :chunk_rows, :batch_rows, :principal)
        ON CONFLICT (id) DO NOTHING""", id=job_id, model=model, version=version, path=str(input_path),
        fmt=input_format, chunk_rows=chunk_rows, batch_rows=batch_rows, principal=principal)
    return await get_job(engine, job_id)


async def get_job(engine: AsyncEngine, job_id: str) -> dict | None:
    return await fetch_one(engine, f"""
        SELECT {JOB_COLUMNS},
               (SELECT count(*) FROM pipeline.job_chunks c WHERE c.job_id = j.id) AS done_chunks,
               (SELECT coalesce(sum(rows), 0) FROM pipeline.job_chunks c WHERE c.job_id = j.id) AS done_rows
        FROM pipeline.jobs j WHERE id = :id""", id=job_id)


async def list_jobs(engine: AsyncEngine, limit: int = 50) -> list[dict]:
    return await fetch_all(engine, f"""
        SELECT {JOB_COLUMNS},
               (SELECT count(*) FROM pipeline.job_chunks c WHERE c.job_id = j.id) AS done_chunks,
               (SELECT coalesce(sum(rows), 0) FROM pipeline.job_chunks c WHERE c.job_id = j.id) AS done_rows
        FROM pipeline.jobs j ORDER BY created_at DESC LIMIT :limit""", limit=limit)


async def mark_running(engine: AsyncEngine, job_id: str, total_chunks: int, total_rows: int,
                       resolved_version: str) -> bool:
    return bool(await execute(engine, """
        UPDATE pipeline.jobs SET status = 'running', total_chunks = :tc, total_rows = :tr,
               resolved_version = :v, started_at = coalesce(started_at, now()), updated_at = now()
        WHERE id = :id AND status IN ('queued', 'running')""",
        id=job_id, tc=total_chunks, tr=total_rows, v=resolved_version))


async def record_chunk(engine: AsyncEngine, job_id: str, idx: int, rows: int) -> bool:
    """Count a chunk done (once, however often it runs); finish the job when it was the last."""
    async with engine.begin() as conn:
        await conn.execute(text("""
            INSERT INTO pipeline.job_chunks (job_id, idx, rows) VALUES (:id, :idx, :rows)
            ON CONFLICT DO NOTHING"""), {"id": job_id, "idx": idx, "rows": rows})
        await conn.execute(text("UPDATE pipeline.jobs SET updated_at = now() WHERE id = :id"), {"id": job_id})
    return await finish_if_complete(engine, job_id)


async def finish_if_complete(engine: AsyncEngine, job_id: str) -> bool:
    return bool(await execute(engine, """
        UPDATE pipeline.jobs j SET status = 'succeeded', finished_at = now(), updated_at = now()
        WHERE id = :id AND status = 'running'
          AND (SELECT count(*) FROM pipeline.job_chunks c WHERE c.job_id = j.id) >= j.total_chunks""",
        id=job_id))


async def fail_job(engine: AsyncEngine, job_id: str, error: dict) -> bool:
    return bool(await execute(engine, """
        UPDATE pipeline.jobs SET status = 'failed', error = CAST(:error AS jsonb), finished_at = now(),
               updated_at = now()
        WHERE id = :id AND status IN ('queued', 'running')""", id=job_id, error=json.dumps(error)))


async def cancel_job(engine: AsyncEngine, job_id: str) -> dict:
    job = await get_job(engine, job_id)
    if job is None:
        raise AppError(404, "job_not_found", f"no job '{job_id}'")
    if job["status"] in FINAL:
        raise AppError(409, "job_finished", f"job is already {job['status']}", {"status": job["status"]})
    await execute(engine, """
        UPDATE pipeline.jobs SET status = 'cancelled', finished_at = now(), updated_at = now()
        WHERE id = :id AND status IN ('queued', 'running')""", id=job_id)
    return await get_job(engine, job_id)


async def unfinished_work(engine: AsyncEngine) -> list[tuple[str, str, list[int]]]:
    """(job id, status, chunk indexes not done) of every queued or running job: the recovery sweep."""
    jobs = await fetch_all(engine, """
        SELECT id, status, total_chunks,
               coalesce((SELECT array_agg(idx) FROM pipeline.job_chunks c WHERE c.job_id = j.id), '{}') AS done
        FROM pipeline.jobs j WHERE status IN ('queued', 'running')""")
    out = []
    for j in jobs:
        done = set(j["done"] or [])
        missing = [i for i in range(j["total_chunks"] or 0) if i not in done]
        out.append((j["id"], j["status"], missing))
    return out


def job_view(job: dict) -> dict[str, Any]:
    """The public shape of a job (no server paths)."""
    total = job.get("total_chunks")
    return {
        "id": job["id"], "kind": job["kind"], "status": job["status"], "model": job["model"],
        "version": job["resolved_version"] or job["version"], "requested_version": job["version"],
        "input_format": job["input_format"],
        "progress": {"done_chunks": int(job.get("done_chunks") or 0), "total_chunks": total,
                     "done_rows": int(job.get("done_rows") or 0), "total_rows": job.get("total_rows"),
                     "fraction": (int(job.get("done_chunks") or 0) / total) if total else
                     (1.0 if job["status"] == "succeeded" else 0.0)},
        "chunk_rows": job["chunk_rows"], "batch_rows": job["batch_rows"], "error": job.get("error"),
        "created_at": job["created_at"], "started_at": job["started_at"], "finished_at": job["finished_at"],
    }
