"""The training task: point-in-time set -> validation (refuse with a report) -> train -> register."""
from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from celery import shared_task
from sqlalchemy import text

from services.model.repository import read_manifest

from . import training, validation
from .db import run_with_engine


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
        await conn.execute(text("""
            INSERT INTO pipeline.training_runs (id, model, status, version, report)
            VALUES (:id, :model, :status, :version, CAST(:report AS jsonb))"""),
            {"id": run_id, "model": model, "status": report["status"], "version": report.get("version"),
             "report": json.dumps(report, default=str)})
    return run_id


@shared_task(name="pipeline.train")
def train(model: str = "fraud", since_s: int | None = None, force: bool = False) -> dict:
    settings = _settings()
    repository = Path(settings.model_repository)
    since = datetime.now(UTC) - timedelta(seconds=since_s) if since_s else None

    async def run(engine):
        examples = await training.labelled_predictions(engine, model, since)
        current = training.current_version(repository, model)
        manifest = read_manifest(current[1]) if current else None
        params = manifest.parameters if manifest else {}
        entity, view = params.get("entity"), params.get("feature_view")
        fetch = (training.feature_store_fetch(settings.features_url, entity, view, settings.http_timeout_s)
                 if entity and view else None)
        features = [t.name for t in manifest.inputs] if manifest else []
        columns, labels = training.point_in_time_set(examples, features, params.get("join_key") or f"{entity}_id",
                                                     fetch)
        labels = [_int_label(v) for v in labels]
        report = training.train_and_register(
            repository, model, columns, labels, limits=_limits(settings), force=force,
            source={"labelled_predictions": len(examples), "since": since.isoformat() if since else None,
                    "feature_store": bool(fetch)})
        report["run_id"] = await record_run(engine, model, report)
        return report

    return json.loads(json.dumps(run_with_engine(settings.require("database_url"), run), default=str))


def _int_label(value):
    from .quality import _label

    return _label(value)
