"""Celery tasks. Each is idempotent: running it twice gives the same result and no duplicates."""
from __future__ import annotations

import httpx
from celery import shared_task

from services.model.client import decode_rows, encode_rows


def _settings():
    from celery import current_app

    return current_app.conf.aistack_settings


@shared_task(name="pipeline.score_rows", bind=True, max_retries=3, default_retry_delay=2)
def score_rows(self, model: str, rows: list[dict], version: str | None = None) -> dict:
    """Score rows on the model server in one v2 request; the building block of batch inference."""
    settings = _settings()
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    try:
        with httpx.Client(base_url=settings.model_url, timeout=settings.http_timeout_s) as http:
            meta = http.get(path).raise_for_status().json()
            resolved = meta["parameters"]["version"]
            response = http.post(f"/v2/models/{model}/versions/{resolved}/infer",
                                 json=encode_rows(meta, rows)).raise_for_status().json()
    except (httpx.TransportError, httpx.HTTPStatusError) as exc:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
            raise
        raise self.retry(exc=exc)
    return {"model": model, "version": resolved, "outputs": decode_rows(response)}
