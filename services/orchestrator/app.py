from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.clients import http_client
from services.chassis.health import add_ready_check
from services.chassis.resources import redis_and_postgres

from .api import router
from .service import ModelGateway, Predictor
from .settings import OrchestratorSettings


def create_app(settings: OrchestratorSettings | None = None) -> FastAPI:
    settings = settings or OrchestratorSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model_http = http_client(settings.model_url, timeout=settings.http_timeout_s)
        app.state.predictor = Predictor(ModelGateway(model_http, settings.metadata_ttl_s), settings.max_batch_rows)

        async def model_server():
            (await model_http.get("/v2/health/live")).raise_for_status()

        add_ready_check(app, "model", model_server)
        async with redis_and_postgres(app, settings):
            try:
                yield
            finally:
                await model_http.aclose()

    app = create_service_app(settings, title="aistack orchestrator",
                             description="The prediction path: routing, caching, enrichment.", lifespan=lifespan)
    app.include_router(router)
    return app
