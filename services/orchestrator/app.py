from __future__ import annotations

from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.clients import http_client
from services.chassis.health import add_ready_check
from services.chassis.resources import redis_and_postgres
from services.chassis.upstream import Proxy, UpstreamPool
from services.features.client import FeatureStoreClient
from services.model.client import AsyncModelClient

from .api import admin, internal, router
from .cache import ResponseCache
from .service import Predictor
from .settings import OrchestratorSettings
from .store import PolicyStore


def create_app(settings: OrchestratorSettings | None = None) -> FastAPI:
    settings = settings or OrchestratorSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model_http = http_client(timeout=settings.http_timeout_s)
        models = Proxy(model_http, UpstreamPool("model", settings.model_replicas), retries=1)
        features_http = http_client(settings.features_url, timeout=settings.http_timeout_s)
        async with redis_and_postgres(app, settings):
            policies = PolicyStore(app.state.engine, app.state.redis)
            try:
                await policies.load()
            except Exception:  # the listener keeps retrying; start serving with default policies
                pass
            policies.start(settings.policy_reload_s)
            predictor = Predictor(
                AsyncModelClient.over_upstream(models, metadata_ttl_s=settings.metadata_ttl_s,
                                               internal_token=settings.internal_token),
                FeatureStoreClient(features_http),
                ResponseCache(app.state.redis), policies, app.state.redis,
                max_batch_rows=settings.max_batch_rows, log_maxlen=settings.prediction_log_maxlen,
                index_ttl_s=settings.feedback_window_s,
            )
            app.state.predictor, app.state.policies = predictor, policies
            app.state.model_pool = models.pool

            async def model_server():
                # Probe replicas directly: a probe failing while the model server starts must not
                # count as a failed request and eject the replica from the pool.
                reasons = []
                for replica in models.pool.replicas:
                    try:
                        r = await model_http.get(f"{replica.url}/v2/health/live", timeout=2.0)
                        if r.status_code == 200:
                            return
                        reasons.append(f"{replica.url}: {r.status_code}")
                    except httpx.HTTPError as exc:
                        reasons.append(f"{replica.url}: {type(exc).__name__}")
                raise RuntimeError("no model server replica is live: " + "; ".join(reasons))

            add_ready_check(app, "model", model_server)
            try:
                yield
            finally:
                await policies.stop()
                await predictor.drain()
                await model_http.aclose()
                await features_http.aclose()

    app = create_service_app(settings, title="aistack orchestrator",
                             description="The prediction path: routing policy, cache, features, log.",
                             lifespan=lifespan)
    app.include_router(router)
    app.include_router(admin)
    app.include_router(internal)
    return app
