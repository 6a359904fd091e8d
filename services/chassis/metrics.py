"""Prometheus metrics: per-route request counts and latency, served at /metrics."""
from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.routing import Match

REQUESTS = Counter(
    "aistack_http_requests_total", "HTTP requests served", ["service", "method", "route", "status"]
)
LATENCY = Histogram(
    "aistack_http_request_duration_seconds", "HTTP request latency", ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_SKIP = {"/metrics", "/health", "/ready"}


def _route_template(app: FastAPI, request: Request) -> str:
    """Label by route template (/v1/predict/{model}), never the raw path: bounded cardinality."""
    route = request.scope.get("route")
    if route is not None:
        return route.path
    for r in app.router.routes:
        if r.matches(request.scope)[0] == Match.FULL:
            return getattr(r, "path", "unmatched")
    return "unmatched"


def install_metrics(app: FastAPI, service: str) -> None:
    @app.middleware("http")
    async def _observe(request: Request, call_next):
        if request.url.path in _SKIP:
            return await call_next(request)
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = _route_template(app, request)
            REQUESTS.labels(service, request.method, route, str(status)).inc()
            LATENCY.labels(service, request.method, route).observe(time.perf_counter() - start)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
