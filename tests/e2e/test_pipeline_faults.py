"""Batch jobs under faults (issue 15) and job ownership and quotas (issue 13), against real
processes: the model server, the pipeline's app and two Celery workers (one with beat, whose
reaper re-queues chunks whose lease expired), on a Redis server of this module's own (so it can
be paused) and the run's Postgres. Postgres and the model server are reached by the workers
through FreezeProxy, which stalls their traffic the way a paused server does, without pausing a
server other tests share. Every test asserts outcomes (end states, rows, codes), never timings;
waits are bounded."""
from __future__ import annotations

import io
import json
import os
import signal
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.demo import synthetic
from tests.conftest import STACK_ENV, free_port, migrated_database
from tests.e2e.freeze_proxy import FreezeProxy

pytestmark = pytest.mark.e2e

FAST = {  # short leases and retries so that faults resolve within a test's patience
    "PIPELINE_LEASE_S": "6", "PIPELINE_HEARTBEAT_S": "2", "PIPELINE_REAP_EVERY_S": "2", "PIPELINE_STALE_S": "20",
    "PIPELINE_CHUNK_MAX_RETRIES": "2", "PIPELINE_HTTP_TIMEOUT_S": "3", "PIPELINE_SUBMIT_QUEUE_TIMEOUT_S": "2",
    "PIPELINE_MAX_ACTIVE_JOBS": "3", "PIPELINE_JOB_MAX_ROWS": "100000", "PIPELINE_WORKER_CONCURRENCY": "2",
}


def _frame(n: int, seed: int) -> pa.Table:
    x, _ = synthetic.transactions(n=n, seed=seed)
    return pa.table({"customer_id": [f"C{i:06d}" for i in range(n)],
                     **{f: x[:, i] for i, f in enumerate(synthetic.FRAUD_FEATURES)}})


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class Faults:
    def __init__(self, stack, redis, pg_proxy, model_proxy, procs):
        self.stack, self.redis, self.pg, self.model, self.procs = stack, redis, pg_proxy, model_proxy, procs
        self.inputs = stack.data_dir / "pipeline" / "inputs"
        self.inputs.mkdir(parents=True, exist_ok=True)

    def client(self, principal: str = "alice", role: str = "", timeout: float = 30) -> httpx.Client:
        headers = {"X-Principal": principal} | ({"X-Principal-Role": role} if role else {})
        return httpx.Client(base_url=self.stack.url("pipeline"), headers=headers, timeout=timeout)

    def put(self, name: str, table: pa.Table) -> str:
        pq.write_table(table, self.inputs / name)
        return f"inputs/{name}"

    def wait(self, client: httpx.Client, job_id: str, until=("succeeded", "failed", "cancelled"),
             timeout: float = 180, done_chunks: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in until and job["progress"]["done_chunks"] >= done_chunks:
                return job
            if job["status"] in ("succeeded", "failed", "cancelled") and job["status"] not in until:
                raise AssertionError(f"job ended {job['status']}: {job}")
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not {until} in {timeout}s: {job}")

    def worker_log(self, name: str) -> str:
        return (self.stack.data_dir / "logs" / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def own_database_url(postgres_server_url):
    """A database of its own: the session stack's reaper would otherwise re-queue this pipeline's
    expired leases onto its own broker and data dir (two pipelines must not share one database)."""
    with migrated_database(postgres_server_url, "faults") as url:
        yield url


@pytest.fixture(scope="module")
def faults(tmp_path_factory, own_database_url, models_dir):
    from services.chassis.embedded import EmbeddedRedis
    from services.cli.stack import DEFAULT_PORTS, Proc, Stack

    database_url = own_database_url
    root = tmp_path_factory.mktemp("pipeline-faults")
    redis = EmbeddedRedis(root / "redis")
    redis_url = redis.start()
    pg = urlsplit(database_url)
    stack = None
    with FreezeProxy(pg.hostname, pg.port or 5432) as pg_proxy:
        try:
            data_dir = root / "stack"
            data_dir.mkdir()
            (data_dir / "models").symlink_to(models_dir)
            stack = Stack(data_dir, database_url=database_url, redis_url=redis_url,
                          ports={name: free_port() for name in DEFAULT_PORTS}, extra_env={**STACK_ENV, **FAST})
            plan = {p.name: p for p in stack._plan()}
            model_url = stack.url("model")
            model_proxy = FreezeProxy("127.0.0.1", stack.ports["model"]).__enter__()
            worker_env = {**plan["worker"].env, "DATABASE_URL": _with_port(database_url, pg_proxy.port),
                          "PIPELINE_MODEL_URL": f"http://127.0.0.1:{model_proxy.port}"}
            logs = data_dir / "logs"
            worker_a = Proc("worker-a", plan["worker"].argv, {**worker_env, "PIPELINE_WORKER_METRICS_PORT": "0"},
                            None, logs / "worker-a.log")
            worker_b = Proc("worker-b", [a for a in plan["worker"].argv if a != "--beat"],
                            {**worker_env, "PIPELINE_WORKER_METRICS_PORT": "0"}, None, logs / "worker-b.log")
            plan["pipeline"].env["PIPELINE_MODEL_URL"] = model_url
            stack.launch([plan["model"], plan["pipeline"], worker_a, worker_b], ready_timeout=240)
            yield Faults(stack, redis, pg_proxy, model_proxy, {"worker-a": worker_a, "worker-b": worker_b})
            model_proxy.__exit__()
        finally:
            if stack is not None:
                stack.stop()
            redis.stop()


def _rows_exactly_once(client: httpx.Client, job_id: str, table: pa.Table) -> None:
    out = pq.read_table(io.BytesIO(client.get(f"/v1/jobs/{job_id}/result", params={"format": "parquet"}).content))
    assert out.column("_row").to_pylist() == list(range(table.num_rows))
    assert out.column("customer_id").to_pylist() == table.column("customer_id").to_pylist()


# -- issue 13: ownership and quotas ---------------------------------------------------------------
def test_another_callers_job_is_not_found_and_admins_see_it_audited(faults):
    path = faults.put("own.parquet", _frame(300, seed=1))
    with faults.client("alice") as alice, faults.client("bob") as bob, faults.client("root", "admin") as admin:
        r = alice.post("/v1/jobs/batch-inference", json={"path": path, "model": "fraud"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        faults.wait(alice, job_id)
        upload = alice.post("/v1/jobs/batch-inference", data={"model": "fraud"},
                            files={"file": ("tx.csv", b"amount\n1\n", "text/csv")})
        assert upload.status_code == 422  # (missing columns; the upload is not kept)

        for method, url in (("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                            ("GET", f"/v1/jobs/{job_id}/result")):
            r = bob.request(method, url)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, url, r.text)
        assert job_id not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
        assert job_id in [j["id"] for j in alice.get("/v1/jobs").json()["jobs"]]
        # Another caller's files (its chunks, its upload) are not inputs bob may name.
        r = bob.post("/v1/jobs/batch-inference", json={"path": f"jobs/{job_id}/chunks/in-00000.parquet",
                                                       "model": "fraud"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "input_not_found"
        # Its owner may (and gets past the ownership check to the next one: `_row` is reserved).
        r = alice.post("/v1/jobs/batch-inference", json={"path": f"jobs/{job_id}/chunks/in-00000.parquet",
                                                         "model": "fraud"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "reserved_column"

        assert admin.get(f"/v1/jobs/{job_id}").status_code == 200
        assert admin.get(f"/v1/jobs/{job_id}/result").status_code == 200
    import redis as redis_lib

    events = redis_lib.Redis.from_url(faults.redis.url).xrange("auth:audit:events")
    actions = [(e[b"actor"], e[b"action"], e[b"target"]) for _, e in events]
    assert (b"root", b"job.read", job_id.encode()) in actions
    assert (b"root", b"job.download", job_id.encode()) in actions


def test_quotas_refuse_with_the_limit_named(faults):
    big = faults.put("too-many-rows.parquet", _frame(100_001, seed=2))
    slow = faults.put("slow.parquet", _frame(20_000, seed=3))
    with faults.client("quota-user") as client:
        r = client.post("/v1/jobs/batch-inference", json={"path": big, "model": "fraud"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "quota_rows"
        assert r.json()["error"]["details"]["limit"] == "rows"
        ids = []
        for _ in range(3):
            r = client.post("/v1/jobs/batch-inference", json={"path": slow, "model": "fraud", "chunk_rows": 500,
                                                              "batch_rows": 50})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        r = client.post("/v1/jobs/batch-inference", json={"path": slow, "model": "fraud"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_concurrent_jobs"
        assert r.json()["error"]["details"] == {"limit": "concurrent_jobs", "max": 3, "active": 3}
        assert r.headers["retry-after"]
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")
        # Another principal is not affected by this one's quota.
        with faults.client("someone-else") as other:
            assert other.post("/v1/jobs/batch-inference", json={"path": slow, "model": "fraud"}).status_code == 202


# -- issue 15: early validation, idempotency -------------------------------------------------------
@pytest.mark.parametrize(("csv", "status", "code", "detail"), [
    (b"amount,amount,txn_count_24h\n1,2,3\n", 422, "duplicate_column", {"column": "amount"}),
    (b"_row,amount\n1,2\n", 422, "reserved_column", {"column": "_row"}),
    (b"amount,customer_id\n1,C1\n", 422, "missing_columns", None),
])
def test_bad_headers_are_refused_before_202_naming_the_column(faults, csv, status, code, detail):
    with faults.client() as client:
        r = client.post("/v1/jobs/batch-inference", data={"model": "fraud"}, files={"file": ("x.csv", csv, "text/csv")})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and "Arrow" not in err["message"]
    if detail:
        assert {k: err["details"][k] for k in detail} == detail
    else:
        assert "txn_count_24h" in err["details"]["missing"]


def test_bad_values_fail_in_words_and_a_header_only_input_has_a_header(faults):
    header = ",".join(["customer_id", *synthetic.FRAUD_FEATURES])
    bad = header + "\n" + "\n".join(f"C{i}," + ",".join(["1"] * 7) for i in range(50)) + "\nC50,oops" + ",1" * 6 + "\n"
    with faults.client() as client:
        r = client.post("/v1/jobs/batch-inference", data={"model": "fraud"},
                        files={"file": ("bad.csv", bad.encode(), "text/csv")})
        assert r.status_code == 202, r.text
        job = faults.wait(client, r.json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_value", job
        assert job["error"]["details"]["row"] == 50 and job["error"]["details"]["column"] == "amount"
        assert "row 50, column 'amount'" in job["error"]["message"]

        r = client.post("/v1/jobs/batch-inference", data={"model": "fraud"},
                        files={"file": ("empty.csv", (header + "\n").encode(), "text/csv")})
        job = faults.wait(client, r.json()["id"])
        assert job["status"] == "succeeded" and job["progress"]["total_rows"] == 0
        lines = client.get(f"/v1/jobs/{job['id']}/result").text.splitlines()
        assert len(lines) == 1 and "customer_id" in lines[0] and "probability_1" in lines[0]


def test_idempotency_key_same_body_same_job_other_body_422(faults):
    path = faults.put("idem.parquet", _frame(200, seed=4))
    with faults.client("idem") as client:
        body = {"path": path, "model": "fraud"}
        first = client.post("/v1/jobs/batch-inference", json=body, headers={"Idempotency-Key": "k-1"})
        again = client.post("/v1/jobs/batch-inference", json=body, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
        r = client.post("/v1/jobs/batch-inference", json={**body, "chunk_rows": 7}, headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
        with faults.client("idem-2") as other:  # keys are per principal
            assert other.post("/v1/jobs/batch-inference", json=body,
                              headers={"Idempotency-Key": "k-1"}).json()["id"] != first.json()["id"]
        assert faults.wait(client, first.json()["id"])["status"] == "succeeded"


# -- issue 15: faults ------------------------------------------------------------------------------
def test_model_server_frozen_past_the_retries_fails_the_job_with_its_chunk(faults):
    path = faults.put("model-down.parquet", _frame(20_000, seed=5))
    with faults.client() as client:
        r = client.post("/v1/jobs/batch-inference", json={"path": path, "model": "fraud", "chunk_rows": 1000,
                                                          "batch_rows": 50})
        assert r.status_code == 202, r.text
        faults.wait(client, r.json()["id"], until=("running",), done_chunks=1)
        faults.model.freeze()
        try:
            job = faults.wait(client, r.json()["id"], timeout=180)
        finally:
            faults.model.thaw()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "model_unavailable" and isinstance(job["error"]["chunk"], int)
    assert "model server" in job["error"]["message"]


def test_postgres_paused_during_progress_writes_the_job_still_succeeds_exactly_once(faults):
    table = _frame(30_000, seed=6)
    path = faults.put("pg-pause.parquet", table)
    with faults.client() as client:
        r = client.post("/v1/jobs/batch-inference", json={"path": path, "model": "fraud", "chunk_rows": 1500,
                                                          "batch_rows": 500})
        job_id = r.json()["id"]
        faults.wait(client, job_id, until=("running",), done_chunks=2)
        faults.pg.freeze()
        time.sleep(8)  # the fault itself: Postgres unreachable for the workers for 8 s
        faults.pg.thaw()
        job = faults.wait(client, job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["progress"]["done_chunks"] == job["progress"]["total_chunks"] == 20
        _rows_exactly_once(client, job_id, table)


def test_one_of_two_workers_sigkilled_is_recovered_without_a_restart(faults):
    table = _frame(30_000, seed=7)
    path = faults.put("kill.parquet", table)
    victim = faults.procs["worker-b"]
    with faults.client() as client:
        r = client.post("/v1/jobs/batch-inference", json={"path": path, "model": "fraud", "chunk_rows": 1000,
                                                          "batch_rows": 25})
        job_id = r.json()["id"]
        faults.wait(client, job_id, until=("running",), done_chunks=3)
        os.killpg(victim.popen.pid, signal.SIGKILL)  # the worker and its pool children; nothing restarts it
        victim.popen.wait()
        job = faults.wait(client, job_id, timeout=240)
        assert job["status"] == "succeeded", job
        assert job["progress"]["done_chunks"] == 30
        _rows_exactly_once(client, job_id, table)
    assert "reaper re-queued work" in faults.worker_log("worker-a")


def test_redis_paused_during_submission_then_a_retry_with_the_same_key_gets_the_same_job(faults):
    table = _frame(2000, seed=8)
    path = faults.put("redis-pause.parquet", table)
    body = {"path": path, "model": "fraud"}
    pid = faults.redis.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with faults.client("retrier", timeout=1.0) as impatient, pytest.raises(httpx.TimeoutException):
            impatient.post("/v1/jobs/batch-inference", json=body, headers={"Idempotency-Key": "nightly-1"})
        with faults.client("retrier") as client:
            r = client.post("/v1/jobs/batch-inference", json=body, headers={"Idempotency-Key": "nightly-1"})
            assert r.status_code == 202, r.text
    finally:
        os.kill(pid, signal.SIGCONT)
    with faults.client("retrier") as client:
        jobs = client.get("/v1/jobs").json()["jobs"]
        assert [j["id"] for j in jobs] == [r.json()["id"]]  # one job, however often the client tried
        job = faults.wait(client, r.json()["id"], timeout=240)
        assert job["status"] == "succeeded", job
        _rows_exactly_once(client, job["id"], table)


# -- issue 15: pool-child logs ---------------------------------------------------------------------
def test_pool_child_logs_reach_the_worker_log_with_trace_ids(faults):
    header = ",".join(["customer_id", *synthetic.FRAUD_FEATURES])
    with faults.client("logs") as client:
        for csv in (header + "\nC1" + ",1" * 7 + "\n", header + "\nC1,x" + ",1" * 6 + "\n"):
            r = client.post("/v1/jobs/batch-inference", data={"model": "fraud"},
                            files={"file": ("in.csv", csv.encode(), "text/csv")})
            faults.wait(client, r.json()["id"])
    lines = []
    for name in ("worker-a", "worker-b"):
        for line in faults.worker_log(name).splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    succeeded = [r for r in lines if "pipeline.score_chunk" in r.get("message", "") and "succeeded" in r["message"]]
    failed = [r for r in lines if r.get("message") == "job failed"]
    assert succeeded and failed
    assert all(r.get("trace_id") for r in succeeded + failed)
    assert {r["logger"] for r in failed} == {"aistack.pipeline.tasks"}
