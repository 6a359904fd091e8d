from __future__ import annotations

import ipaddress
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.resources import redis_and_postgres

from .api import admin, internal, public, router
from .service import AuthService
from .settings import AuthSettings


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with redis_and_postgres(app, settings):
            auth = AuthService(app.state.engine, app.state.redis, settings)
            app.state.auth = auth
            await auth.keys.ensure()
            await auth.bootstrap_admin(settings.bootstrap_admin_email, settings.bootstrap_admin_password)
            yield

    app = create_service_app(settings, title="aistack auth",
                             description="Users, roles, tokens, API keys and JWKS.", lifespan=lifespan)
    app.state.trusted_proxies = [ipaddress.ip_network(c.strip(), strict=False)
                                 for c in settings.trusted_proxies.split(",") if c.strip()]
    for r in (router, admin, public, internal):
        app.include_router(r)
    return app
