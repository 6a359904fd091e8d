"""Feature-store tasks: the pipeline asks the features service (its owner) to materialise.

Scheduled by beat (incremental: each run continues where the last stopped) and callable on
demand with an explicit window. Idempotent: a re-run writes nothing new.
"""
from __future__ import annotations

import httpx
from celery import shared_task


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
    body = {k: v for k, v in {"views": views, "start": start, "end": end}.items() if v is not None}
    try:
        with httpx.Client(base_url=settings.features_url,
                          timeout=httpx.Timeout(max(settings.http_timeout_s, 300.0), connect=5.0)) as http:
            response = http.post("/admin/features/materialize", json=body)
            response.raise_for_status()
    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
            raise  # a bad window or an unknown view: retrying will not help
        raise self.retry(exc=exc)
    return response.json()
