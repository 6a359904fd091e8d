from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.clientip import parse_networks
from services.chassis.clients import http_client
from services.chassis.internal import require_internal_token
from services.chassis.resources import redis_and_postgres

from .api import admin, internal, me_router, public, router
from .privacy import AuditLog, Subjects
from .service import AuthService
from .settings import AuthSettings


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        require_internal_token(settings)
        async with redis_and_postgres(app, settings):
            auth = AuthService(app.state.engine, app.state.redis, settings)
            app.state.auth = auth
            await auth.keys.ensure()
            await auth.bootstrap_admin(settings.bootstrap_admin_email, settings.bootstrap_admin_password)
            # Privacy (docs/privacy.md): audit log, data-subject export and erasure.
            app.state.audit = AuditLog(auth.sessions, app.state.redis)
            subjects_http = http_client(timeout=settings.subject_timeout_s)
            app.state.subjects = Subjects(auth.sessions, app.state.audit, subjects_http, settings, auth.revocations)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(auth.revocations.run(stop)),
                     asyncio.create_task(app.state.subjects.run(stop))]
            if settings.audit_consumer:
                tasks.append(asyncio.create_task(app.state.audit.consume(stop)))
            try:
                yield
            finally:
                stop.set()
                await asyncio.wait(tasks, timeout=5.0)
                for task in tasks:
                    task.cancel()
                await subjects_http.aclose()

    app = create_service_app(settings, title="aistack auth",
                             description="Users, roles, tokens, API keys and JWKS.", lifespan=lifespan)
    app.state.trusted_proxies = parse_networks(settings.trusted_proxies)
    for r in (router, admin, public, internal, me_router):
        app.include_router(r)
    return app
