"""Liveness, readiness and per-request load shedding (docs/deploy.md explains the three).

- `/health` (liveness): the process answers. Host CPU and memory ride along as details (and as
  metrics); they never fail it.
- `/ready` ("send me traffic"): the service's own dependencies, and its own saturation with
  hysteresis: not ready only after it has been shedding load without a break for
  `saturation_enter_s`, ready again after `saturation_exit_s` without shedding. Host CPU is
  deliberately not a reason: on a busy node that would take the busiest replicas out of the pool
  one after another until nothing serves (a cascading failure).
- Load shedding: more than `max_inflight` requests in flight and the excess gets 503 with
  Retry-After at once, per request, while the replica stays in the pool. Services with their own
  queues (the model server's batchers) shed there too and report it with `note_shed`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge

from .errors import error_response

ReadyCheck = Callable[[], Awaitable[object]]
access = logging.getLogger("aistack.access")
_EXEMPT = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes are never shed

HOST_CPU = Gauge("aistack_host_cpu_percent", "Host CPU use, percent (a detail, never a readiness reason)",
                 ["service"])
HOST_MEMORY = Gauge("aistack_host_memory_percent", "Host memory use, percent", ["service"])
INFLIGHT = Gauge("aistack_inflight_requests", "Requests being served now", ["service"])
SHED = Counter("aistack_shed_requests_total", "Requests answered 503 because the service was saturated",
               ["service"])
SATURATED = Gauge("aistack_saturated", "1 while sustained shedding keeps /ready at 503", ["service"])


class Saturation:
    """Hysteresis over shedding events, so one burst never flaps readiness.

    An episode starts at the first shed and lasts while sheds keep coming less than `exit_s`
    apart. The service counts as saturated once an episode has lasted `enter_s`, and stops
    counting as saturated once `exit_s` pass without a shed.
    """

    def __init__(self, enter_s: float, exit_s: float, clock: Callable[[], float] = time.monotonic):
        self.enter_s, self.exit_s, self.clock = enter_s, exit_s, clock
        self.episode_start: float | None = None
        self.last_shed: float | None = None
        self.reason = ""

    def shed(self, reason: str) -> None:
        now = self.clock()
        if self.last_shed is None or now - self.last_shed >= self.exit_s:
            self.episode_start = now
        self.last_shed, self.reason = now, reason

    @property
    def saturated(self) -> bool:
        if self.episode_start is None or self.last_shed is None:
            return False
        now = self.clock()
        return now - self.last_shed < self.exit_s and now - self.episode_start >= self.enter_s

    def describe(self) -> str:
        return f"shedding load for {self.clock() - self.episode_start:.0f}s: {self.reason}"


def add_ready_check(app: FastAPI, name: str, check: ReadyCheck) -> None:
    """Register a dependency check; it passes unless it raises or times out."""
    app.state.ready_checks[name] = check


def note_shed(app: FastAPI, reason: str) -> None:
    """A request was refused for lack of capacity (a full queue, too many in flight)."""
    app.state.saturation.shed(reason)
    SHED.labels(app.state.settings.service_name).inc()


async def _run_check(check: ReadyCheck, timeout: float) -> str | None:
    try:
        await asyncio.wait_for(check(), timeout)
        return None
    except TimeoutError:
        return f"timed out after {timeout}s"
    except Exception as exc:  # noqa: BLE001 (any failure means not ready; the reason goes to the caller)
        return f"{type(exc).__name__}: {exc}"[:300]


_last_cpu_times = psutil.cpu_times()


def _cpu_percent() -> float:
    """Host CPU busy since the previous reading, from any thread (psutil's own cpu_percent keeps
    one baseline per thread, so the first reading in a server thread says 0)."""
    global _last_cpu_times
    now = psutil.cpu_times()
    before, _last_cpu_times = _last_cpu_times, now
    total = sum(now) - sum(before)
    idle = now.idle + getattr(now, "iowait", 0.0) - before.idle - getattr(before, "iowait", 0.0)
    return round(100.0 * max(0.0, total - idle) / total, 1) if total > 0 else 0.0


def host_usage(service: str) -> dict[str, float]:
    """Host CPU and memory, for /health details and metrics only."""
    cpu, mem = _cpu_percent(), psutil.virtual_memory().percent
    HOST_CPU.labels(service).set(cpu)
    HOST_MEMORY.labels(service).set(mem)
    return {"cpu_percent": cpu, "memory_percent": mem}


def mark_draining(app: FastAPI) -> None:
    """The service is shutting down: /ready answers 503 from now on, so load balancers and
    Kubernetes stop sending new requests while the ones in flight finish."""
    app.state.draining = True


def is_draining(app: FastAPI) -> bool:
    return getattr(app.state, "draining", False)


class LoadShedMiddleware:
    """Answer 503 + Retry-After to requests beyond `limit` in flight (pure ASGI, no buffering),
    and write one access-log line per request: it runs inside the server span, so the line
    carries the trace id that `aistack logs --trace-id` and Loki follow across services."""

    def __init__(self, app, fastapi_app: FastAPI, limit: int, access_log: bool = True):
        self.app, self.fastapi_app, self.limit, self.access_log = app, fastapi_app, limit, access_log
        self.inflight = 0
        self.service = fastapi_app.state.settings.service_name

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in _EXEMPT:
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if 0 < self.limit <= self.inflight:
                note_shed(self.fastapi_app, f"{self.inflight} requests in flight (limit {self.limit})")
                response = error_response(503, "overloaded", "the service is at capacity; retry shortly",
                                          {"inflight": self.inflight, "limit": self.limit}, {"Retry-After": "1"})
                return await response(scope, receive, observed_send)
            self.inflight += 1
            INFLIGHT.labels(self.service).set(self.inflight)
            try:
                await self.app(scope, receive, observed_send)
            finally:
                self.inflight -= 1
                INFLIGHT.labels(self.service).set(self.inflight)
        finally:
            if self.access_log:
                access.info("%s %s %s", scope.get("method"), scope.get("path"), status[0] or 500,
                            extra={"status": status[0] or 500,
                                   "duration_ms": round((time.perf_counter() - started) * 1000, 2)})


def install_health(app: FastAPI, settings) -> None:
    app.state.ready_checks = {}
    app.state.draining = False
    app.state.saturation = Saturation(settings.saturation_enter_s, settings.saturation_exit_s)
    app.add_middleware(LoadShedMiddleware, fastapi_app=app, limit=settings.max_inflight,
                       access_log=settings.access_log)

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> dict:
        saturation = request.app.state.saturation
        return {"status": "ok", "service": settings.service_name,
                "details": {**host_usage(settings.service_name), "saturated": saturation.saturated}}

    @app.get("/ready", include_in_schema=False)
    async def ready(request: Request):
        if is_draining(request.app):
            return error_response(503, "shutting_down", "the service is shutting down", None,
                                  {"Retry-After": "5"})
        checks = request.app.state.ready_checks
        results = await asyncio.gather(
            *(_run_check(c, settings.ready_check_timeout_s) for c in checks.values())
        )
        reasons = {n: r for n, r in zip(checks, results) if r is not None}
        saturation = request.app.state.saturation
        SATURATED.labels(settings.service_name).set(int(saturation.saturated))
        if saturation.saturated:
            reasons["saturation"] = saturation.describe()
        if reasons:
            message = "; ".join(f"{k}: {v}" for k, v in reasons.items())
            return error_response(503, "not_ready", message, reasons, {"Retry-After": "5"})
        return JSONResponse({"status": "ready", "service": settings.service_name,
                             "checks": {n: "ok" for n in checks}})
