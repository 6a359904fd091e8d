"""Feature-store tasks: the pipeline asks the features service (its owner) to materialise.

Scheduled by beat (incremental: each run continues where the last stopped) and callable on
demand with an explicit window. Idempotent: a re-run writes nothing new.
"""
from __future__ import annotations

from celery import shared_task

from services.features.client import FeatureStoreError, SyncFeatureStoreClient


def _settings():
    from celery import current_app

    return current_app.conf.aistack_settings


@shared_task(name="pipeline.materialize_features", bind=True, max_retries=3, default_retry_delay=10)
def materialize_features(self, views: list[str] | None = None, start: str | None = None,
                         end: str | None = None) -> dict:
    """POST /admin/features/materialize on the features service; returns its per-view results.

    views: default every view. start/end: ISO 8601 event-time window; neither means incremental.
    """
    settings = _settings()
    try:
        with SyncFeatureStoreClient(settings.features_url, max(settings.http_timeout_s, 300.0)) as store:
            return {"results": store.materialize(views, start, end)}
    except FeatureStoreError as exc:
        if not exc.retryable:
            raise  # a bad window or an unknown view: retrying will not help
        raise self.retry(exc=exc) from None
