"""The Redis client and database engine a service owns, opened in its lifespan with ready checks."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from .clients import db_engine, db_ping, redis_client, redis_ping
from .health import add_ready_check


@asynccontextmanager
async def redis_and_postgres(app: FastAPI, settings, *, redis: bool = True, postgres: bool = True):
    """Put app.state.redis / app.state.engine in place and register their readiness checks."""
    if redis:
        app.state.redis = redis_client(settings.require("redis_url"))
        add_ready_check(app, "redis", redis_ping(app.state.redis))
    if postgres:
        app.state.engine = db_engine(settings.require("database_url"))
        add_ready_check(app, "postgres", db_ping(app.state.engine))
    try:
        yield
    finally:
        if redis:
            await app.state.redis.aclose()
        if postgres:
            await app.state.engine.dispose()
