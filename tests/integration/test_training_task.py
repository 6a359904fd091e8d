"""The training task end to end: labelled predictions in Postgres -> the model server's metadata and
holdout scores -> a new version registered through its repository API, recorded as a run."""
from __future__ import annotations

import json
import shutil
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text

from services.demo import synthetic
from services.model.app import create_app
from services.model.client import ModelClient
from services.model.settings import ModelSettings
from services.pipeline.db import fetch_all, run_with_engine
from services.pipeline.settings import PipelineSettings
from services.pipeline.tables import training_runs
from tests.conftest import ServedApp

MODEL = f"t{uuid.uuid4().hex[:8]}"  # our own model name: the shared tables hold other tests' rows


@pytest.fixture
def served_model(models_dir, tmp_path):
    """fraud's versions 1 and 2 under this test's model name, on a real server with a token."""
    repo = tmp_path / "models"
    shutil.copytree(models_dir / "fraud", repo / MODEL)
    for version in ("1", "2"):
        manifest = repo / MODEL / version / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": MODEL}))
    app = create_app(ModelSettings(repository=repo, internal_token="t0ken", repository_poll_s=0,
                                   ready_max_cpu_percent=100, ready_max_memory_percent=100))
    with ServedApp(app) as served:
        yield served, repo


def _labelled(database_url, n=1500):
    x, y = synthetic.transactions(n=n, seed=77)
    now = datetime.now(UTC)
    preds, labels = [], []
    for i, (row, label) in enumerate(zip(x.tolist(), y.tolist())):
        pid = f"{MODEL}-{i}"
        preds.append({"pid": pid, "time": now, "model": MODEL, "inputs": json.dumps(dict(zip(synthetic.FRAUD_FEATURES, row)))})
        labels.append({"pid": pid, "label": json.dumps(int(label)), "model": MODEL, "time": now})

    async def insert(engine):
        async with engine.begin() as conn:
            await conn.execute(text("""
                INSERT INTO pipeline.predictions (prediction_id, row, time, model, version, inputs, outputs, stream_id)
                VALUES (:pid, 0, :time, :model, '2', CAST(:inputs AS jsonb), '{}', '0-0')"""), preds)
            await conn.execute(text("""
                INSERT INTO pipeline.feedback (prediction_id, row, label, principal, model, version, time, stream_id)
                VALUES (:pid, 0, CAST(:label AS jsonb), 'u1', :model, '2', :time, '0-0')"""), labels)
    run_with_engine(database_url, insert)


def test_the_train_task_registers_through_the_model_servers_api(database_url, redis_url, served_model):
    from services.pipeline.celery_app import create_celery

    served, repo = served_model
    _labelled(database_url)
    settings = PipelineSettings(database_url=database_url, redis_url=redis_url, model_url=served.url,
                                internal_token="t0ken",
                                # No row carries the join key: the feature store is never asked.
                                features_url="http://127.0.0.1:9")
    # The pipeline's own Celery app, current here: other tests make other apps current.
    app = create_celery(settings)
    app.loader.import_default_modules()  # what a worker does at start: registers the tasks
    app.set_current()
    report = app.tasks["pipeline.train"].apply(kwargs={"model": MODEL, "force": True}).get()
    assert report["status"] == "registered", report
    assert report["version"] == "3" and report["current_version"] == "2" and report["state"] == "READY"
    assert report["source"]["labelled_predictions"] == 1500 and report["validation"]["ok"]
    with ModelClient(served.url) as models:  # served at once, by the server that owns the files
        meta = models.metadata(MODEL)
        assert meta["parameters"]["version"] == "3" and meta["parameters"]["parent_version"] == "2"
    assert (repo / MODEL / "3" / "manifest.json").is_file()
    runs = run_with_engine(database_url, lambda e: fetch_all(e, select(training_runs.c.status, training_runs.c.version)
                                                          .where(training_runs.c.id == report["run_id"])))
    assert [(r["status"], r["version"]) for r in runs] == [("registered", "3")]
