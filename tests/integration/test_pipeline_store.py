"""Job state in a real Postgres (schema `pipeline` of a database of our own): the last chunk and
the status change in one transaction, leases and the reaper, idempotency keys, quotas, and the
data-subject export and erasure of job data (issue 20)."""
from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from services.chassis.errors import AppError
from services.pipeline import batch, store, subjects
from services.pipeline.db import run_with_engine
from tests.conftest import schema_database


@pytest.fixture(scope="module")
def pipeline_db(postgres_server_url):
    with schema_database(postgres_server_url, "pipeline") as url:
        yield url


def _values(job_id: str, principal: str = "u1", owner: str | None = None) -> dict:
    return {"id": job_id, "model": "fraud", "version": None, "input_path": "/nowhere.csv", "input_format": "csv",
            "chunk_rows": 10, "batch_rows": 10, "principal": principal, "owner": owner}


run = run_with_engine


def test_a_poll_never_reads_all_chunks_done_while_running(pipeline_db):
    async def scenario(engine):
        await store.create_job(engine, _values("tx1"), max_active=100)
        await store.mark_running(engine, "tx1", total_chunks=40, total_rows=400, resolved_version="1")
        seen = []
        done = asyncio.Event()

        async def poll():
            while not done.is_set():
                job = await store.get_job(engine, "tx1")
                seen.append((job["status"], job["done_chunks"]))
                await asyncio.sleep(0)

        async def record(i):
            return await store.record_chunk(engine, "tx1", i, 10)

        poller = asyncio.create_task(poll())
        finished = await asyncio.gather(*(record(i) for i in range(40)))
        done.set()
        await poller
        return finished, seen, await store.get_job(engine, "tx1")

    finished, seen, job = run(pipeline_db, scenario)
    assert sum(finished) == 1  # exactly one chunk finished the job
    assert job["status"] == "succeeded" and job["done_chunks"] == 40 and job["done_rows"] == 400
    assert not [s for s in seen if s == ("running", 40)]


def test_leases_keep_others_off_and_the_reaper_finds_expired_ones(pipeline_db):
    async def scenario(engine):
        await store.create_job(engine, _values("lease1"), max_active=100)
        await store.mark_running(engine, "lease1", total_chunks=3, total_rows=30, resolved_version="1")
        assert await store.claim_lease(engine, "lease1", 0, "task-a", 30)
        assert not await store.claim_lease(engine, "lease1", 0, "task-b", 30)  # a live lease: hands off
        assert await store.claim_lease(engine, "lease1", 0, "task-a", 30)  # its own retry may
        assert await store.claim_lease(engine, "lease1", 1, "task-c", 0.01)
        await asyncio.sleep(0.05)
        work = await store.reap(engine, stale_s=3600)
        assert work["chunks"] == [("lease1", 1)]  # expired (its worker died); chunk 0 is alive
        assert await store.claim_lease(engine, "lease1", 1, "task-d", 30)  # the re-queued task takes it
        assert await store.heartbeat(engine, "lease1", 0, "task-a", 30)
        assert not await store.heartbeat(engine, "lease1", 0, "task-b", 30)
        await store.record_chunk(engine, "lease1", 0, 10)
        assert await store.claim_lease(engine, "lease1", 0, "task-e", 30)  # counted: the lease is gone
        await store.cancel_job(engine, "lease1")
        return await store.reap(engine, stale_s=0)

    assert run(pipeline_db, scenario)["chunks"] == []  # nothing of a cancelled job is re-queued


def test_idempotency_keys_and_the_concurrent_jobs_quota(pipeline_db):
    async def scenario(engine):
        _, created = await store.create_job(engine, _values("idem1", "p-idem"), max_active=2,
                                              idempotency=("key", "digest-a", 60))
        again, created_again = await store.create_job(engine, _values("idem2", "p-idem"), max_active=2,
                                                      idempotency=("key", "digest-a", 60))
        assert created and not created_again and again["id"] == "idem1"
        with pytest.raises(store.IdempotencyConflict):
            await store.create_job(engine, _values("idem3", "p-idem"), max_active=2,
                                   idempotency=("key", "digest-b", 60))
        await store.create_job(engine, _values("idem4", "p-idem"), max_active=2)
        with pytest.raises(AppError) as e:
            await store.create_job(engine, _values("idem5", "p-idem"), max_active=2)
        assert e.value.status == 429 and e.value.details["limit"] == "concurrent_jobs"
        await store.cancel_job(engine, "idem4")
        await store.create_job(engine, _values("idem6", "p-idem"), max_active=2)  # room again

    run(pipeline_db, scenario)


def test_export_carries_job_inputs_and_results_and_erasure_removes_the_files(pipeline_db, tmp_path):
    meta = {"name": "m", "parameters": {"version": "1"}, "inputs": [{"name": "amount", "datatype": "FP32",
                                                                     "shape": [-1]}], "outputs": []}
    src = tmp_path / "in.csv"
    src.write_text("amount,note\n1.5,secret-value-42\n2.5,x\n")
    files = batch.JobFiles(tmp_path, "subj1")
    total_chunks, total_rows = batch.split_input(files, src, "csv", 10, meta,
                                                 batch.InputLimits(max_rows=100, max_bytes=1 << 20))
    table = batch.pq.read_table(files.chunk(0))
    batch.write_parquet_atomic(table.append_column("label", pa.array([1, 0])), files.part(0))

    async def scenario(engine):
        # Submitted with the subject's API key: X-Principal-Owner names the subject.
        await store.create_job(engine, {**_values("subj1", "apikey:k1", owner="subject-1"),
                                        "input_path": str(src)}, max_active=100)
        await store.mark_running(engine, "subj1", total_chunks, total_rows, "1")
        await store.record_chunk(engine, "subj1", 0, 2)
        await store.create_job(engine, _values("other1", "someone-else"), max_active=100)
        exported = await subjects.export_subject(engine, "subject-1", tmp_path)
        erased = await subjects.erase_subject(engine, "subject-1", tmp_path)
        return exported, erased, await subjects.export_subject(engine, "subject-1", tmp_path), \
            await store.get_job(engine, "other1")

    exported, erased, after, other = run(pipeline_db, scenario)
    [job] = exported["jobs"]
    assert job["id"] == "subj1" and job["submitted_by"] == "apikey:k1"
    assert [r["note"] for r in job["input_rows"]] == ["secret-value-42", "x"]
    assert [(r["note"], r["label"]) for r in job["result_rows"]] == [("secret-value-42", 1), ("x", 0)]
    assert job["result_url"] == "/v1/jobs/subj1/result" and not job["truncated"]
    assert erased["jobs"] == 1 and after["jobs"] == []
    assert not files.root.exists() and other is not None
