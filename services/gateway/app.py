from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.clientip import parse_networks
from services.chassis.clients import http_client
from services.chassis.errors import AppError
from services.chassis.health import add_ready_check
from services.chassis.internal import internal_headers, require_internal_token
from services.chassis.limits import set_body_limit
from services.chassis.resources import redis_and_postgres
from services.chassis.upstream import Proxy, UpstreamPool

from .api import admin_ui_router, guard_operator_routes, overview_router, router
from .overview import Overview, Upstreams
from .ratelimit import RateLimiter
from .revocation import RevocationMap
from .routes import ROUTES
from .security import ApiKeyVerifier, Authenticator, FailedAuthLimiter, JWKSCache, TokenVerifier
from .service import Gateway
from .settings import GatewaySettings


async def _warm_jwks(jwks, every_s: float = 1.0, attempts: int = 120) -> None:
    """Load auth's keys at start without a warning per try: on a fresh stack auth starts after
    the gateway. Requests fetch on demand too; a failure after `attempts` tries is logged."""
    for attempt in range(attempts):
        await jwks.refresh("startup", quiet=attempt < attempts - 1)
        if jwks.keys:
            return
        await asyncio.sleep(every_s)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s = settings
        http = http_client(timeout=s.http_timeout_s)
        pools = {name: UpstreamPool(name, urls, s.eject_after_failures, s.eject_s) for name, urls in (
            ("orchestrator", s.orchestrator_replicas), ("features", s.features_replicas), ("auth", s.auth_replicas),
            ("pipeline", s.pipeline_replicas), ("model", s.model_replicas))}
        proxies = {name: Proxy(http, pool, s.retries, s.upstream_timeout_s) for name, pool in pools.items()}
        auth = proxies["auth"]
        internal = internal_headers(s.introspection_token or s.internal_token)

        async def fetch_jwks() -> dict:
            r = await auth.forward("GET", "/.well-known/jwks.json", b"", {"accept": "application/json"},
                                   timeout_s=5.0)
            if r.status_code != 200:
                raise RuntimeError(f"auth answered {r.status_code} for the JWKS")
            return r.json()

        async def introspect(key: str) -> dict:
            r = await auth.forward("POST", "/internal/introspect", json_bytes({"api_key": key}),
                                   {"content-type": "application/json", **internal}, timeout_s=5.0)
            if r.status_code != 200:
                raise AppError(503, "auth_unavailable", "cannot check the API key now",
                               headers={"Retry-After": "2"})
            return r.json()

        jwks = JWKSCache(fetch_jwks, s.jwks_cache_s, s.jwks_min_refetch_s)
        require_internal_token(s, s.introspection_token)
        async with redis_and_postgres(app, s, postgres=False):
            revocations = RevocationMap(app.state.redis, s.revocation_grace_s)
            follower = asyncio.create_task(revocations.run())
            with contextlib.suppress(TimeoutError):  # Redis late: requests fail closed until it is up
                await asyncio.wait_for(revocations.ready.wait(), 5.0)
            tokens = TokenVerifier(jwks, s.jwt_issuer, s.jwt_audience, s.algorithms, s.jwt_leeway_s, revocations)
            api_keys = ApiKeyVerifier(app.state.redis, introspect, s.api_key_cache_ttl_s,
                                      s.api_key_negative_cache_ttl_s, revocations)
            failures = FailedAuthLimiter(app.state.redis, s.auth_failures_per_minute)
            limiter = RateLimiter(app.state.redis, s.rate_limit_fail_open, secret=s.internal_token)
            app.state.revocations = revocations
            app.state.gateway = Gateway(s, proxies, Authenticator(tokens, api_keys, failures), limiter)
            app.state.orchestrator = proxies["orchestrator"]
            app.state.jwks = jwks
            for name in ("orchestrator", "auth"):
                add_ready_check(app, name, _pool_check(pools[name]))
            # /ready is public here: its reasons name no address (the logs have the detail).
            for name, check in list(app.state.ready_checks.items()):
                app.state.ready_checks[name] = _opaque(name, check)
            # Warm the key cache; auth may start after us, so retry quietly until it answers.
            warm = asyncio.create_task(_warm_jwks(jwks))
            app.state.overview = _overview(app, s, http, pools, proxies)
            scraper = asyncio.create_task(app.state.overview.run())
            try:
                yield
            finally:
                warm.cancel()
                scraper.cancel()
                follower.cancel()
                await http.aclose()

    app = create_service_app(settings, title="aistack gateway",
                             description="The public entry point of aistack.", lifespan=lifespan)
    # Gateway-local routes first: the route table's /admin/{rest:path} would take them otherwise.
    app.include_router(overview_router)
    if settings.admin_ui:
        from fastapi.staticfiles import StaticFiles

        app.include_router(admin_ui_router)
        app.mount("/admin/assets", StaticFiles(directory=STATIC_DIR), name="admin-assets")
    app.include_router(router)
    guard_operator_routes(app)
    app.state.trusted_proxies = parse_networks(settings.trusted_proxies)
    for route in ROUTES:  # streamed uploads (batch-inference files) have their own, larger cap
        if route.stream_body:
            set_body_limit(app, route.path, settings.max_upload_bytes)
    return app


STATIC_DIR = Path(__file__).with_name("static")


def _overview(app: FastAPI, s: GatewaySettings, http, pools: dict, proxies: dict) -> Overview:
    """The admin overview's scraper over every upstream replica, plus this gateway's own registry."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation
    from prometheus_client import REGISTRY, generate_latest

    async def fetch(url: str, headers: dict) -> tuple[int, bytes]:
        with suppress_instrumentation():  # scrapes every few seconds are not traces anyone wants
            r = await http.get(url, headers=headers, timeout=5.0)
        return r.status_code, r.content

    def getter(name: str):
        async def get(path: str, headers: dict | None = None) -> tuple[int, bytes]:
            path, _, query = path.partition("?")
            r = await proxies[name].forward("GET", path, b"", {"accept": "application/json", **(headers or {})},
                                            query, timeout_s=5.0)
            return r.status_code, r.content
        return get

    services = {name: [r.url for r in pools[name].replicas]
                for name in ("auth", "orchestrator", "model", "features", "pipeline")}
    overview = Overview(fetch, services, every_s=s.overview_scrape_s, window_s=s.overview_window_s,
                        summary_s=s.overview_summary_s, self_name=s.service_name,
                        self_metrics=lambda: generate_latest(REGISTRY).decode(), self_version=app.version,
                        upstreams=Upstreams(getter("model"), getter("orchestrator"), getter("pipeline")))
    return overview


def json_bytes(doc) -> bytes:
    import json

    return json.dumps(doc).encode()


def _opaque(name: str, check):
    async def opaque():
        try:
            await check()
        except Exception as exc:  # noqa: BLE001 - any failure: not ready, reason logged only
            logging.getLogger("aistack.gateway").warning("not ready: %s: %s", name, exc)
            raise RuntimeError("unavailable") from None
    return opaque


def _pool_check(pool: UpstreamPool):
    async def check():
        if not pool.healthy():
            raise RuntimeError(f"every {pool.name} replica is ejected")
    return check
