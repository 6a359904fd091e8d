"""The pipeline's HTTP face: health, readiness (broker and database) and metrics for the workers."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.resources import redis_and_postgres

from .settings import PipelineSettings


def create_app(settings: PipelineSettings | None = None) -> FastAPI:
    settings = settings or PipelineSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with redis_and_postgres(app, settings):
            yield

    return create_service_app(settings, title="aistack pipeline",
                              description="Celery workers for batch inference, monitoring and training.",
                              lifespan=lifespan)
