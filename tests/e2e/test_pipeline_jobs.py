"""Batch inference jobs with real Redis, Postgres, model server and Celery worker processes."""
from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from services.demo import synthetic
from tests.conftest import STACK_ENV, claimed_redis_db, free_port, migrated_database

pytestmark = pytest.mark.e2e


def _frame(n: int, seed: int) -> pa.Table:
    x, _ = synthetic.transactions(n=n, seed=seed)
    cols = {f: x[:, i] for i, f in enumerate(synthetic.FRAUD_FEATURES)}
    return pa.table({"customer_id": [f"C{i:06d}" for i in range(n)], **cols})


def _wait(client: httpx.Client, job_id: str, timeout: float = 120, until=("succeeded", "failed", "cancelled")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not done: {job}")


def _direct(models_dir: Path, version: str, table: pa.Table) -> np.ndarray:
    import joblib

    est = joblib.load(models_dir / "fraud" / version / "model.joblib")
    x = np.column_stack([table.column(f).to_numpy() for f in synthetic.FRAUD_FEATURES]).astype(np.float32)
    return est.predict_proba(x)


def test_100k_row_upload_matches_the_model_called_directly(stack):
    table = _frame(100_000, seed=2024)
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    with httpx.Client(base_url=stack.url("pipeline"), timeout=60) as client:
        r = client.post("/v1/jobs/batch-inference", files={"file": ("tx.csv", buf.getvalue(), "text/csv")},
                        data={"model": "fraud", "version": "2", "chunk_rows": "20000"})
        assert r.status_code == 202, r.text
        job = _wait(client, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["progress"]["done_chunks"] == job["progress"]["total_chunks"] == 5
        assert job["progress"]["done_rows"] == 100_000 and job["version"] == "2"
        result = client.get(f"/v1/jobs/{job['id']}/result")
        assert result.status_code == 200 and result.headers["content-type"].startswith("text/csv")
        out = pacsv.read_csv(io.BytesIO(result.content))
        pq_result = client.get(f"/v1/jobs/{job['id']}/result", params={"format": "parquet"})
        assert pq.read_table(io.BytesIO(pq_result.content)).num_rows == 100_000
    assert out.column("_row").to_pylist() == list(range(100_000))
    assert out.column("customer_id").to_pylist() == table.column("customer_id").to_pylist()
    expected = _direct(stack.models_dir, "2", table)
    got = np.column_stack([out.column("probability_0").to_numpy(), out.column("probability_1").to_numpy()])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert out.column("label").to_pylist() == expected.argmax(axis=1).tolist()


def test_server_side_path_cancel_and_bad_requests(stack):
    data_dir = stack.data_dir / "pipeline"
    (data_dir / "inputs").mkdir(parents=True, exist_ok=True)
    pq.write_table(_frame(2000, seed=1), data_dir / "inputs" / "small.parquet")
    with httpx.Client(base_url=stack.url("pipeline"), timeout=60) as client:
        r = client.post("/v1/jobs/batch-inference", json={"path": "inputs/small.parquet", "model": "fraud"})
        assert r.status_code == 202, r.text
        job = _wait(client, r.json()["id"])
        assert job["status"] == "succeeded" and job["progress"]["total_rows"] == 2000
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409

        r = client.post("/v1/jobs/batch-inference", json={"path": "../../etc/passwd", "model": "fraud"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"
        r = client.post("/v1/jobs/batch-inference", json={"path": "/etc/hostname", "model": "fraud"})
        assert r.status_code == 403
        r = client.post("/v1/jobs/batch-inference", files={"file": ("x.txt", b"a,b\n", "text/plain")},
                        data={"model": "fraud"})
        assert r.status_code == 415
        assert client.get("/v1/jobs/nope").status_code == 404

        # A model that does not exist, or an input without its features: refused before 202.
        r = client.post("/v1/jobs/batch-inference", json={"path": "inputs/small.parquet", "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        pq.write_table(pa.table({"amount": [1.0, 2.0]}), data_dir / "inputs" / "partial.parquet")
        r = client.post("/v1/jobs/batch-inference", json={"path": "inputs/partial.parquet", "model": "fraud"})
        assert r.status_code == 422 and "txn_count_24h" in r.json()["error"]["details"]["missing"]

        # Cancel a job while it runs: it stops, and stays cancelled.
        pq.write_table(_frame(30_000, seed=3), data_dir / "inputs" / "big.parquet")
        r = client.post("/v1/jobs/batch-inference", json={"path": "inputs/big.parquet", "model": "fraud",
                                                          "chunk_rows": 500, "batch_rows": 50})
        job_id = r.json()["id"]
        _wait(client, job_id, until=("running", "succeeded"))
        c = client.post(f"/v1/jobs/{job_id}/cancel")
        assert c.status_code in (200, 409)
        if c.status_code == 200:
            assert c.json()["status"] == "cancelled"
            time.sleep(1.0)
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "cancelled" and job["progress"]["done_chunks"] < job["progress"]["total_chunks"]
            assert client.get(f"/v1/jobs/{job_id}/result").status_code == 409


# -- SIGKILL in the middle of a job ---------------------------------------------------------------
@pytest.fixture()
def own_broker(redis_server_url):
    """A Redis db of our own: the stack's worker must not take our tasks."""
    with claimed_redis_db(redis_server_url) as url:
        yield url


@pytest.fixture()
def own_database_url(postgres_server_url):
    """A database of its own: the stack's reaper must not re-queue our chunks onto its broker."""
    with migrated_database(postgres_server_url, "jobs") as url:
        yield url


@pytest.fixture()
def pipeline_only(stack, own_broker, own_database_url, tmp_path):
    """The pipeline app and a worker as processes (Stack's own machinery), on their own broker and
    database, scoring on the stack's model server."""
    from services.cli.stack import Stack

    ports = {**stack.ports, "pipeline": free_port()}
    (tmp_path / "models").symlink_to(stack.models_dir)
    s = Stack(tmp_path, database_url=own_database_url, redis_url=own_broker, ports=ports,
              extra_env={**STACK_ENV, "PIPELINE_VISIBILITY_TIMEOUT_S": "5", "PIPELINE_WORKER_CONCURRENCY": "2",
                         "PIPELINE_WORKER_METRICS_PORT": str(free_port())})
    plan = {p.name: p for p in s._plan()}
    s._spawn(plan["pipeline"])
    s._spawn(plan["worker"])
    s._wait_ready(60)
    s.worker_proc = plan["worker"]
    yield s
    s.stop()


def _respawn(s, proc):
    from dataclasses import replace

    s.procs.remove(proc)
    fresh = replace(proc, popen=None, env={**proc.env, "PIPELINE_WORKER_METRICS_PORT": str(free_port())})
    s._spawn(fresh)
    return fresh


def test_sigkilled_worker_loses_and_duplicates_nothing(pipeline_only):
    s = pipeline_only
    n = 40_000
    table = _frame(n, seed=77)
    inputs = s.data_dir / "pipeline" / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, inputs / "kill.parquet")
    worker = s.worker_proc
    metrics_port = int(worker.env["PIPELINE_WORKER_METRICS_PORT"])
    with httpx.Client(base_url=s.url("pipeline"), timeout=60) as client:
        # Small model batches make each chunk take a while, so the kill lands mid-job.
        r = client.post("/v1/jobs/batch-inference", json={"path": "inputs/kill.parquet", "model": "fraud",
                                                          "version": "1", "chunk_rows": 1000, "batch_rows": 25})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["progress"]["done_chunks"] >= 3:
                break
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.02)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert "aistack_pipeline_tasks_total" in metrics and "aistack_pipeline_queue_depth" in metrics
        os.killpg(worker.popen.pid, signal.SIGKILL)  # the worker and its pool children, mid-job
        worker.popen.wait()
        killed_at = client.get(f"/v1/jobs/{job_id}").json()
        assert killed_at["status"] == "running"
        assert killed_at["progress"]["done_chunks"] < killed_at["progress"]["total_chunks"]

        _respawn(s, worker)
        job = _wait(client, job_id, timeout=180)
        assert job["status"] == "succeeded", job
        assert job["progress"]["done_chunks"] == job["progress"]["total_chunks"] == 40
        out = pq.read_table(io.BytesIO(client.get(f"/v1/jobs/{job_id}/result", params={"format": "parquet"}).content))
    rows = out.column("_row").to_pylist()
    assert len(rows) == n and rows == list(range(n))  # every input row exactly once, in order
    assert out.column("customer_id").to_pylist() == table.column("customer_id").to_pylist()
    expected = _direct(s.models_dir, "1", table)
    np.testing.assert_allclose(out.column("probability_1").to_numpy(), expected[:, 1], rtol=1e-5, atol=1e-6)
