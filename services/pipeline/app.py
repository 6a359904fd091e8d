"""The pipeline's HTTP face: the batch job API, quality/drift/training admin, health, readiness
(broker and database) and metrics."""
from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.internal import publish_audit
from services.chassis.limits import set_body_limit
from services.chassis.resources import redis_and_postgres
from services.model.client import AsyncModelClient

from .api import admin, gauge_loop, internal, jobs
from .service import JobService
from .settings import PipelineSettings


def create_app(settings: PipelineSettings | None = None) -> FastAPI:
    settings = settings or PipelineSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from .celery_app import create_celery

        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        async with redis_and_postgres(app, settings), httpx.AsyncClient(
                base_url=settings.model_url, timeout=httpx.Timeout(settings.http_timeout_s, connect=3.0)) as http:
            app.state.celery = create_celery(settings)

            async def audit(actor: str, action: str, target: str, role: str) -> None:
                await publish_audit(app.state.redis, actor, action, target, service="pipeline", actor_role=role)

            app.state.jobs = JobService(settings, app.state.engine, app.state.celery.send_task,
                                        AsyncModelClient.over(http, internal_token=settings.internal_token,
                                                              metadata_ttl_s=5.0), audit)
            gauges = asyncio.create_task(gauge_loop(app.state.engine))
            try:
                yield
            finally:
                gauges.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gauges
                app.state.celery.close()

    app = create_service_app(settings, title="aistack pipeline",
                             description="Batch inference jobs, model quality, drift and training; "
                                         "Celery workers do the work.",
                             lifespan=lifespan)
    app.include_router(jobs)
    app.include_router(admin)
    app.include_router(internal)
    set_body_limit(app, "/v1/jobs/batch-inference", settings.max_upload_bytes)  # uploads
    return app
