"""Prediction-log persistence, quality and drift against real Redis and Postgres."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select

from services.demo import synthetic
from services.pipeline import drift, logstore, quality, training
from services.pipeline.db import fetch_all, run_with_engine
from services.pipeline.tables import predictions

# A model name of our own per run, so shared tables never mix with other tests' rows.
MODEL = f"m{uuid.uuid4().hex[:8]}"



@pytest.fixture(scope="module")
def redis_url(private_redis_url):
    """These tests count whole streams: other modules' predictions must not be in them."""
    return private_redis_url


def _run(database_url, fn):
    return run_with_engine(database_url, fn)


async def _xadd_predictions(redis_url, entries):
    r = aioredis.from_url(redis_url)
    try:
        for e in entries:
            await r.xadd(logstore.PREDICTION_STREAM, e)
    finally:
        await r.aclose()


def _prediction(pid, version, rows, outputs, t=None):
    return {"id": pid, "time": f"{t or time.time():.6f}", "principal": "u1", "model": MODEL, "version": version,
            "input_hash": "h", "inputs": json.dumps(rows), "outputs": json.dumps(outputs), "latency_ms": "1.5",
            "cached": "0"}


def _persist(redis_url, database_url, group="pipeline"):
    async def run(engine):
        client = aioredis.from_url(redis_url)
        try:
            return await logstore.persist(client, engine, group)
        finally:
            await client.aclose()
    return _run(database_url, run)


def _pending(redis_url, stream):
    async def run():
        client = aioredis.from_url(redis_url)
        try:
            return await logstore.pending(client, stream)
        finally:
            await client.aclose()
    return asyncio.run(run())


def test_log_persistence_acks_after_commit_and_survives_a_postgres_outage(redis_url, database_url):
    pids = [uuid.uuid4().hex for _ in range(3)]
    asyncio.run(_xadd_predictions(redis_url, [
        _prediction(pids[0], "1", [{"amount": 1.0}], [{"label": 0, "probability": [0.9, 0.1]}]),
        _prediction(pids[1], "1", [{"amount": 2.0}, {"amount": 3.0}],
                    [{"label": 1, "probability": [0.2, 0.8]}, {"label": 0, "probability": [0.7, 0.3]}]),
    ]))
    # Postgres is down (nothing listens there): the run fails, nothing is acknowledged.
    dead = "postgresql://postgres@127.0.0.1:1/nowhere"
    from sqlalchemy.exc import SQLAlchemyError

    with pytest.raises((OSError, SQLAlchemyError)):
        _persist(redis_url, dead)
    assert _pending(redis_url, logstore.PREDICTION_STREAM) == 2
    asyncio.run(_xadd_predictions(redis_url, [
        _prediction(pids[2], "2", [{"amount": 4.0}], [{"label": 1, "probability": [0.1, 0.9]}])]))
    # Postgres is back: the pending entries land, then the new one; everything is acknowledged.
    out = _persist(redis_url, database_url)
    assert out[0]["stored_rows"] == 4
    assert _pending(redis_url, logstore.PREDICTION_STREAM) == 0
    p = predictions
    rows = _run(database_url, lambda e: fetch_all(e, select(p.c.prediction_id, p.c.row, p.c.inputs, p.c.outputs)
                                                  .where(p.c.model == MODEL).order_by(p.c.prediction_id, p.c.row)))
    assert sorted((r["prediction_id"], r["row"]) for r in rows) == sorted(
        [(pids[0], 0), (pids[1], 0), (pids[1], 1), (pids[2], 0)])
    assert {r["inputs"]["amount"] for r in rows} == {1.0, 2.0, 3.0, 4.0}
    # A redelivered entry (same id) is not stored twice.
    asyncio.run(_xadd_predictions(redis_url, [
        _prediction(pids[0], "1", [{"amount": 1.0}], [{"label": 0, "probability": [0.9, 0.1]}])]))
    _persist(redis_url, database_url)
    n = _run(database_url, lambda e: fetch_all(e, select(func.count().label("n")).select_from(p)
                                               .where(p.c.model == MODEL)))
    assert n[0]["n"] == 4


def test_quality_joins_feedback_per_version_and_matches_hand_computation(redis_url, database_url):
    model = f"q{uuid.uuid4().hex[:8]}"
    # Version 1: the hand-computed example of the unit tests; version 2: every prediction right.
    y = [1, 0, 1, 1, 0, 0, 1, 0]
    pred = [1, 0, 0, 1, 1, 0, 1, 0]
    score = [0.9, 0.2, 0.4, 0.8, 0.6, 0.1, 0.7, 0.4]
    preds, feedback = [], []
    for version, labels, preds_, scores in (("1", y, pred, score), ("2", y, y, [0.9 if v else 0.1 for v in y])):
        pid = uuid.uuid4().hex
        preds.append({**_prediction(pid, version, [{"amount": float(i)} for i in range(8)],
                                    [{"label": p, "probability": [1 - s, s]} for p, s in zip(preds_, scores)]),
                      "model": model})
        for row, label in enumerate(labels):
            feedback.append({"prediction_id": pid, "row": row, "label": json.dumps(label), "principal": "u1",
                             "model": model, "version": version, "time": f"{time.time():.6f}"})

    async def add():
        r = aioredis.from_url(redis_url)
        try:
            for e in preds:
                await r.xadd(logstore.PREDICTION_STREAM, e)
            for e in feedback:
                await r.xadd(logstore.FEEDBACK_STREAM, e)
        finally:
            await r.aclose()

    asyncio.run(add())
    _persist(redis_url, database_url)
    results = _run(database_url, lambda e: quality.compute_quality(e, 3600))
    ours = {r["version"]: r for r in results if r["model"] == model}
    v1 = ours["1"]
    assert v1["n"] == 8 and v1["counts"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert v1["accuracy"] == pytest.approx(0.75) and v1["precision"] == pytest.approx(0.75)
    assert v1["recall"] == pytest.approx(0.75) and v1["f1"] == pytest.approx(0.75)
    assert v1["roc_auc"] == pytest.approx(14.5 / 16)
    assert ours["2"]["accuracy"] == 1.0 and ours["2"]["roc_auc"] == 1.0
    report = _run(database_url, lambda e: quality.quality_report(e, model))
    assert [v["version"] for v in report["versions"]] == ["1", "2"]
    assert report["ab"]["verdict"] == "insufficient_data" and report["ab"]["samples"] == {"1": 8, "2": 8}


def test_drift_against_the_versions_baseline(database_url, models_dir, tmp_path):
    model = "fraud"
    repo = tmp_path / "models"
    shutil.copytree(models_dir / "fraud", repo / "fraud")
    version = f"d{uuid.uuid4().hex[:6]}"
    shutil.copytree(repo / "fraud" / "2", repo / "fraud" / version)  # a version only this test logs to
    x, _ = synthetic.transactions(n=400, seed=11)
    rows = [dict(zip(synthetic.FRAUD_FEATURES, r.tolist())) for r in x]
    for r in rows[:]:
        r["amount"] = r["amount"] * 20 + 1000  # amounts far above anything in training

    async def insert(engine):
        from sqlalchemy import text

        async with engine.begin() as conn:
            await conn.execute(text("""
                INSERT INTO pipeline.predictions (prediction_id, row, time, model, version, inputs, outputs, stream_id)
                VALUES (:pid, :row, now(), :model, :version, CAST(:inputs AS jsonb), '{}', '0-0')"""),
                [{"pid": uuid.uuid4().hex, "row": 0, "model": model, "version": version,
                  "inputs": json.dumps(r)} for r in rows])
        return await drift.compute_drift(engine, repo, 600, 0.2, min_rows=100)

    results = [r for r in _run(database_url, insert) if r["version"] == version]
    assert len(results) == 1
    report = results[0]
    assert report["n"] == 400 and report["alert"] is True and "amount" in report["drifted"]
    assert report["psi"]["account_age_days"] < 0.2
    latest = _run(database_url, lambda e: drift.latest_drift(e, model))
    assert any(r["version"] == version and r["alert"] for r in latest)


def _columns(x):
    return {f: x[:, i].tolist() for i, f in enumerate(synthetic.FRAUD_FEATURES)}


def test_training_refuses_poison_with_a_report_and_registers_clean_data(models_dir, tmp_path):
    """The pipeline registers through the model server's API: the server writes, hashes and serves."""
    from services.model.app import create_app
    from services.model.client import ModelClient
    from services.model.repository import read_manifest
    from services.model.settings import ModelSettings
    from tests.conftest import ServedApp

    repo = tmp_path / "models"
    shutil.copytree(models_dir / "fraud", repo / "fraud")
    server = create_app(ModelSettings(repository=repo, internal_token="t0ken", ready_max_cpu_percent=100,
                                      ready_max_memory_percent=100))
    x, y = synthetic.transactions(n=20_000, seed=123)
    rng = np.random.default_rng(3)
    with ServedApp(server) as served, ModelClient(served.url, internal_token="t0ken") as models:
        flipped = y.copy()
        mask = rng.uniform(size=len(y)) < 0.35
        flipped[mask] = 1 - flipped[mask]
        out = training.train_and_register(models, "fraud", _columns(x), flipped.tolist())
        assert out["status"] == "refused" and {"label_balance", "label_consistency"} <= set(out["validation"]["failed"])

        bad_x = x.copy()
        bad_x[rng.uniform(size=len(y)) < 0.25, 4] = -99_999  # account age out of range in a quarter of rows
        out = training.train_and_register(models, "fraud", _columns(bad_x), y.tolist())
        assert out["status"] == "refused" and out["validation"]["failed"] == ["ranges"]
        assert sorted(p.name for p in (repo / "fraud").iterdir()) == ["1", "2"]  # nothing registered

        out = training.train_and_register(models, "fraud", _columns(x), y.tolist(), tolerance=0.05)
        assert out["status"] == "registered", out
        assert out["version"] == "3" and out["validation"]["ok"] and out["state"] == "READY"
        served_now = models.metadata("fraud")  # the server serves the new version at once
        assert served_now["parameters"]["version"] == "3" and served_now["parameters"]["parent_version"] == "2"
        assert served_now["parameters"]["entity"] == "customer" and "device" in served_now["parameters"]
        assert len(models.infer_rows("fraud", [dict(zip(synthetic.FRAUD_FEATURES, x[0].tolist()))])) == 1
    manifest = read_manifest(repo / "fraud" / "3")  # the server hashed every artifact
    assert manifest.parameters["parent_version"] == "2" and set(manifest.artifacts) == {"model.joblib", "baseline.json"}
    assert "version" not in manifest.parameters and "dynamic_batching" not in manifest.parameters
    assert len(json.loads((repo / "fraud" / "3" / "baseline.json").read_text())["amount"]) == 11
