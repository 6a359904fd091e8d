"""Prometheus metrics: per-route request counts and latency, served at /metrics.

Observed by a pure ASGI middleware (Starlette's BaseHTTPMiddleware costs a task and a stream
per request: issue 18); each label combination's children are looked up once and kept.
"""
from __future__ import annotations

import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "aistack_http_requests_total", "HTTP requests served", ["service", "method", "route", "status"]
)
LATENCY = Histogram(
    "aistack_http_request_duration_seconds", "HTTP request latency", ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_SKIP = frozenset({"/metrics", "/health", "/ready"})
# Any token is a valid HTTP method, so a client could mint label values: others count as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def _route_template(app: ASGIApp, scope: Scope) -> str:
    """Label by route template (/v1/predict/{model}), never the raw path: bounded cardinality."""
    route = scope.get("route")
    if route is not None:
        return route.path
    router = getattr(app, "router", None)
    for r in getattr(router, "routes", ()):
        if r.matches(scope)[0] == Match.FULL:
            return getattr(r, "path", "unmatched")
    return "unmatched"


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, service: str, root: FastAPI):
        self.app, self.service, self.root = app, service, root
        self._counters: dict[tuple[str, str, str], object] = {}
        self._histograms: dict[tuple[str, str], object] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _SKIP:
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def observe_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe_status)
        finally:
            self._observe(scope, status, time.perf_counter() - start)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in _METHODS else "other"
        route = _route_template(self.root, scope)
        key = (method, route, str(status))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(self.service, *key)
        counter.inc()
        histogram = self._histograms.get(key[:2])
        if histogram is None:
            histogram = self._histograms[key[:2]] = LATENCY.labels(self.service, method, route)
        histogram.observe(seconds)


def install_metrics(app: FastAPI, service: str) -> None:
    app.add_middleware(MetricsMiddleware, service=service, root=app)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
