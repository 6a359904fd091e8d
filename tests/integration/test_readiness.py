"""/ready tells the truth about the service's own Redis and Postgres."""
from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.chassis.clients import asyncpg_url
from services.features.app import create_app as features_app
from services.features.settings import FeaturesSettings
from tests.conftest import free_port


async def ready(app) -> httpx.Response:
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.get("/ready")


def settings(**kw) -> FeaturesSettings:
    # Demo seeding needs a reachable database; these tests are about readiness only.
    return FeaturesSettings(seed_demo=False, **kw)


async def test_ready_when_dependencies_answer(database_url, redis_url):
    r = await ready(features_app(settings(database_url=database_url, redis_url=redis_url)))
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"redis": "ok", "postgres": "ok"}


@pytest.mark.parametrize("broken", ["redis", "postgres"])
async def test_ready_is_503_with_reason_when_a_dependency_is_down(database_url, redis_url, broken):
    closed = free_port()  # nothing listens here
    urls = {"database_url": database_url, "redis_url": redis_url}
    urls["redis_url" if broken == "redis" else "database_url"] = (
        f"redis://127.0.0.1:{closed}/0" if broken == "redis" else f"postgresql://nobody@127.0.0.1:{closed}/x"
    )
    r = await ready(features_app(settings(**urls)))
    assert r.status_code == 503
    assert r.headers["retry-after"]
    error = r.json()["error"]
    assert error["code"] == "not_ready"
    assert broken in error["details"] and error["details"][broken]


async def test_migrations_create_one_schema_per_owner(database_url):
    engine = create_async_engine(asyncpg_url(database_url))
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT schema_name FROM information_schema.schemata"))
        schemas = {r[0] for r in rows}
    await engine.dispose()
    assert {"auth", "orchestrator", "features", "pipeline"} <= schemas
