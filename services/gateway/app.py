from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.clients import http_client
from services.chassis.health import add_ready_check
from services.chassis.resources import redis_and_postgres

from .api import router
from .service import Proxy, UpstreamPool
from .settings import GatewaySettings


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        http = http_client(timeout=settings.http_timeout_s)
        pool = UpstreamPool("orchestrator", settings.orchestrator_replicas,
                            settings.eject_after_failures, settings.eject_s)
        app.state.orchestrator = Proxy(http, pool)

        async def orchestrator():
            if not pool.healthy():
                raise RuntimeError("every orchestrator replica is ejected")

        add_ready_check(app, "orchestrator", orchestrator)
        async with redis_and_postgres(app, settings, postgres=False):
            try:
                yield
            finally:
                await http.aclose()

    app = create_service_app(settings, title="aistack gateway",
                             description="The public entry point of aistack.", lifespan=lifespan)
    app.include_router(router)
    return app
