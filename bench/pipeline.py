"""Batch inference throughput, measured side by side in one run:

  1. a batch job through the real stack (pipeline API -> Redis broker -> Celery worker processes ->
     model server over HTTP, chunk parts on disk, job state in Postgres), submit to succeeded;
  2. raw in-process predict of the same model version on the same rows (one predict_proba call);
  3. the seed's approach: pandas chunks with one model call per row (timed on a sample, since a
     million single-row calls take far too long; rows/s is what is compared).

    python -m bench.pipeline [--rows 1000000] [--seed-rows 5000] [--database-url SERVER_URL --redis-url URL]

Without URLs the stack starts embedded PostgreSQL and Redis. With a server URL, the benchmark
uses its own database `aistack_bench` on that server.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.demo import synthetic

VERSION = "2"


def make_input(path: Path, n: int) -> pa.Table:
    x, _ = synthetic.transactions(n=n, seed=2025)
    table = pa.table({"customer_id": [f"C{i:07d}" for i in range(n)],
                      **{f: x[:, i] for i, f in enumerate(synthetic.FRAUD_FEATURES)}})
    pq.write_table(table, path)
    return table


def bench_job(stack, rel_path: str, n: int, chunk_rows: int | None, batch_rows: int | None) -> tuple[float, dict]:
    """Submit to succeeded. Sizes left out (the default) are the server's: what a user gets."""
    sizes = {k: v for k, v in (("chunk_rows", chunk_rows), ("batch_rows", batch_rows)) if v}
    with httpx.Client(base_url=stack.url("pipeline"), timeout=60) as client:
        t0 = time.perf_counter()
        r = client.post("/v1/jobs/batch-inference", json={"path": rel_path, "model": "fraud", "version": VERSION,
                                                          **sizes})
        r.raise_for_status()
        job_id = r.json()["id"]
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise SystemExit(f"job ended {job['status']}: {job.get('error')}")
    assert job["progress"]["done_rows"] == n
    return elapsed, job


def bench_raw(models_dir: Path, table: pa.Table) -> float:
    import joblib

    est = joblib.load(models_dir / "fraud" / VERSION / "model.joblib")
    x = np.column_stack([table.column(f).to_numpy() for f in synthetic.FRAUD_FEATURES]).astype(np.float32)
    t0 = time.perf_counter()
    est.predict_proba(x)
    return time.perf_counter() - t0


def bench_seed(models_dir: Path, path: Path, rows: int) -> float:
    """The seed: read with pandas in chunks, then one model call per row."""
    import joblib
    import pandas as pd

    est = joblib.load(models_dir / "fraud" / VERSION / "model.joblib")
    csv = path.with_suffix(".sample.csv")
    pq.read_table(path).slice(0, rows).to_pandas().to_csv(csv, index=False)
    t0 = time.perf_counter()
    out = []
    for chunk in pd.read_csv(csv, chunksize=1000):
        for _, row in chunk.iterrows():
            x = np.array([[row[f] for f in synthetic.FRAUD_FEATURES]], dtype=np.float32)
            out.append(est.predict_proba(x)[0])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed-rows", type=int, default=5_000)
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: PIPELINE_CHUNK_ROWS")
    ap.add_argument("--batch-rows", type=int, default=None, help="default: PIPELINE_INFER_BATCH_ROWS")
    ap.add_argument("--workers", type=int, default=2, help="Celery worker concurrency")
    ap.add_argument("--database-url")
    ap.add_argument("--redis-url")
    args = ap.parse_args()

    from services.chassis.embedded import free_port
    from services.cli.stack import Stack, ensure_database

    data_dir = Path(tempfile.mkdtemp(prefix="aistack-bench-pipeline-"))
    db = ensure_database(args.database_url, "aistack_bench") if args.database_url else None
    stack = Stack(data_dir, database_url=db, redis_url=args.redis_url,
                  ports={k: free_port() for k in Stack(data_dir).ports},
                  extra_env={"PIPELINE_WORKER_CONCURRENCY": str(args.workers), "PIPELINE_WORKER_METRICS_PORT": "0",
                             "LOG_LEVEL": "WARNING", "PIPELINE_LOG_LEVEL": "WARNING"})
    print(f"starting the stack in {data_dir} ...", flush=True)
    stack.start()
    try:
        inputs = data_dir / "pipeline" / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        table = make_input(inputs / "bench.parquet", args.rows)
        job_s, job = bench_job(stack, "inputs/bench.parquet", args.rows, args.chunk_rows, args.batch_rows)
        raw_s = bench_raw(stack.models_dir, table)
        seed_s = bench_seed(stack.models_dir, inputs / "bench.parquet", args.seed_rows)
    finally:
        stack.stop()
    job_rps, raw_rps, seed_rps = args.rows / job_s, args.rows / raw_s, args.seed_rows / seed_s
    print(f"\nfraud v{VERSION}, {args.rows:,} rows, {os.cpu_count()} CPUs, worker concurrency {args.workers}, "
          f"chunks of {job['chunk_rows']:,}, model calls of {job['batch_rows']:,} rows "
          f"({'given' if args.chunk_rows or args.batch_rows else 'the defaults'})")
    print(f"{'approach':<52}{'seconds':>10}{'rows/s':>14}")
    print(f"{'batch job (API->Celery->model server HTTP->parts)':<52}{job_s:>10.2f}{job_rps:>14,.0f}")
    print(f"{'raw in-process predict_proba (one call)':<52}{raw_s:>10.2f}{raw_rps:>14,.0f}")
    print(f"{f'seed: pandas chunks, one call per row ({args.seed_rows:,} rows)':<52}{seed_s:>10.2f}{seed_rps:>14,.0f}")
    print(f"\nbatch job = {job_rps / raw_rps:.2f}x raw in-process, {job_rps / seed_rps:.0f}x the seed's approach")


if __name__ == "__main__":
    main()
