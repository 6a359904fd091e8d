from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.resources import redis_and_postgres

from .api import admin, internal, router
from .service import FeatureStore
from .settings import FeaturesSettings

log = logging.getLogger("aistack.features")


def create_app(settings: FeaturesSettings | None = None) -> FastAPI:
    settings = settings or FeaturesSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with redis_and_postgres(app, settings):
            store = FeatureStore(
                app.state.engine, app.state.redis, prefix=settings.redis_prefix,
                registry_cache_s=settings.registry_cache_s, expired_grace_s=settings.expired_grace_s,
                max_online_ids=settings.max_online_ids, max_historical_rows=settings.max_historical_rows,
                max_push_rows=settings.max_push_rows, materialize_lag_s=settings.materialize_lag_s,
                pii_keys=settings.pii_keys or "")
            app.state.store = store
            if settings.seed_demo:
                report = await store.seed_demo(settings.seed_customers, settings.seed_snapshots)
                log.info("demo feature data ready: %s rows seeded", report["seeded_rows"])
            task = asyncio.create_task(_freshness_loop(store, settings.freshness_interval_s))
            try:
                yield
            finally:
                # Bounded: a refresh stuck in a client call that swallows the cancellation must not
                # hold the shutdown (the connections are closed next, which ends it).
                task.cancel()
                await asyncio.wait({task}, timeout=5)

    app = create_service_app(settings, title="aistack feature store",
                             description="Feature registry, online store (Redis), offline store (Postgres), "
                                         "point-in-time retrieval, push and materialisation.",
                             lifespan=lifespan)
    app.include_router(router)
    app.include_router(admin)
    app.include_router(internal)
    return app


async def _freshness_loop(store: FeatureStore, interval: float) -> None:
    """Keep aistack_features_freshness_seconds current (age of the newest online value per view)."""
    if interval <= 0:
        return
    while True:
        try:
            await store.refresh_freshness()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a metrics refresh never takes the service down
            log.warning("freshness refresh failed: %s", exc)
        await asyncio.sleep(interval)
