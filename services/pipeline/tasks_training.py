"""The training task: point-in-time set -> validation (refuse with a report) -> train -> register."""
from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from celery import shared_task
from sqlalchemy import insert

from services.features.client import SyncFeatureStoreClient
from services.model.client import ModelClient

from . import training, validation
from .db import run_with_engine
from .tables import training_runs


def _settings():
    from celery import current_app

    return current_app.conf.aistack_settings


def _limits(settings) -> validation.Limits:
    return validation.Limits(min_rows=settings.train_min_rows, max_null_share=settings.train_max_null_share,
                             max_out_of_range_share=settings.train_max_out_of_range_share,
                             max_duplicate_share=settings.train_max_duplicate_share,
                             max_label_shift=settings.train_max_label_shift)


async def record_run(engine, model: str, report: dict) -> str:
    run_id = uuid.uuid4().hex
    async with engine.begin() as conn:
        await conn.execute(insert(training_runs).values(
            id=run_id, model=model, status=report["status"], version=report.get("version"),
            report=json.loads(json.dumps(report, default=str))))
    return run_id


@shared_task(name="pipeline.train")
def train(model: str = "fraud", since_s: int | None = None, force: bool = False) -> dict:
    settings = _settings()
    since = datetime.now(UTC) - timedelta(seconds=since_s) if since_s else None

    async def run(engine):
        examples = await training.labelled_predictions(engine, model, since)
        # The model server describes the current version and registers the new one (its own API).
        with ModelClient(settings.model_url, settings.http_timeout_s,
                         internal_token=settings.internal_token) as models, \
                SyncFeatureStoreClient(settings.features_url, max(settings.http_timeout_s, 60.0)) as store:
            meta = training.current_model(models, model)
            bound = training.binding(meta)
            fetch = training.feature_store_fetch(store, bound.entity, bound.view) if bound else None
            features = [t["name"] for t in meta["inputs"]] if meta else []
            columns, labels = training.point_in_time_set(examples, features, bound.join_key if bound else "",
                                                         fetch)
            labels = [_int_label(v) for v in labels]
            report = training.train_and_register(
                models, model, columns, labels, limits=_limits(settings), force=force,
                source={"labelled_predictions": len(examples), "since": since.isoformat() if since else None,
                        "feature_store": bool(fetch)})
        report["run_id"] = await record_run(engine, model, report)
        return report

    return json.loads(json.dumps(run_with_engine(settings.require("database_url"), run), default=str))


def _int_label(value):
    from .quality import _label

    return _label(value)
