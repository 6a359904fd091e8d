"""The pipeline's HTTP face: the batch job API, quality/drift/training admin, health, readiness
(broker and database) and metrics."""
from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.limits import set_body_limit
from services.chassis.resources import redis_and_postgres

from .api import admin, gauge_loop, internal, jobs
from .settings import PipelineSettings


def create_app(settings: PipelineSettings | None = None) -> FastAPI:
    settings = settings or PipelineSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from .celery_app import create_celery

        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        async with redis_and_postgres(app, settings):
            app.state.celery = create_celery(settings)
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
