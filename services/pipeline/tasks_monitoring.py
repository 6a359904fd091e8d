"""Periodic monitoring tasks (beat): prediction-log persistence, model quality, feature drift."""
from __future__ import annotations

from pathlib import Path

from celery import shared_task

from . import drift, logstore, quality
from .db import run_with_engine


def _settings():
    from celery import current_app

    return current_app.conf.aistack_settings


def _jsonable(rows: list[dict]) -> list[dict]:
    return [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()} for r in rows]


@shared_task(name="pipeline.persist_logs", bind=True, max_retries=None, default_retry_delay=5)
def persist_logs(self) -> list[dict]:
    """Stream -> Postgres; on a database error nothing is acked and the entries wait for the next run."""
    import redis.asyncio as aioredis

    settings = _settings()

    async def run(engine):
        client = aioredis.from_url(settings.require("redis_url"), socket_timeout=10)
        try:
            return await logstore.persist(client, engine, settings.log_consumer_group, settings.log_batch)
        finally:
            await client.aclose()

    return run_with_engine(settings.require("database_url"), run)


@shared_task(name="pipeline.compute_quality")
def compute_quality() -> list[dict]:
    settings = _settings()
    rows = run_with_engine(settings.require("database_url"),
                           lambda e: quality.compute_quality(e, settings.quality_window_s))
    return _jsonable(rows)


@shared_task(name="pipeline.compute_drift")
def compute_drift() -> list[dict]:
    settings = _settings()
    rows = run_with_engine(settings.require("database_url"), lambda e: drift.compute_drift(
        e, Path(settings.model_repository), settings.drift_window_s, settings.drift_psi_alert,
        settings.drift_min_rows))
    return _jsonable(rows)
