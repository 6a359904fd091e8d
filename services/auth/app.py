from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.resources import redis_and_postgres

from .settings import AuthSettings


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with redis_and_postgres(app, settings):
            yield

    return create_service_app(settings, title="aistack auth", description="Users, roles, tokens, API keys and JWKS.", lifespan=lifespan)
