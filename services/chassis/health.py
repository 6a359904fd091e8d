"""Liveness and readiness. /ready checks the service's own dependencies and node saturation."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .errors import error_response

ReadyCheck = Callable[[], Awaitable[object]]


def add_ready_check(app: FastAPI, name: str, check: ReadyCheck) -> None:
    """Register a dependency check; it passes unless it raises or times out."""
    app.state.ready_checks[name] = check


async def _run_check(check: ReadyCheck, timeout: float) -> str | None:
    try:
        await asyncio.wait_for(check(), timeout)
        return None
    except TimeoutError:
        return f"timed out after {timeout}s"
    except Exception as exc:  # noqa: BLE001 (any failure means not ready; the reason goes to the caller)
        return f"{type(exc).__name__}: {exc}"[:300]


def _resource_reasons(settings) -> dict[str, str]:
    reasons = {}
    cpu = psutil.cpu_percent(interval=None)
    mem = psutil.virtual_memory().percent
    if cpu > settings.ready_max_cpu_percent:
        reasons["cpu"] = f"cpu at {cpu:.0f}% > {settings.ready_max_cpu_percent:.0f}%"
    if mem > settings.ready_max_memory_percent:
        reasons["memory"] = f"memory at {mem:.0f}% > {settings.ready_max_memory_percent:.0f}%"
    return reasons


def mark_draining(app: FastAPI) -> None:
    """The service is shutting down: /ready answers 503 from now on, so load balancers and
    Kubernetes stop sending new requests while the ones in flight finish."""
    app.state.draining = True


def is_draining(app: FastAPI) -> bool:
    return getattr(app.state, "draining", False)


def install_health(app: FastAPI, settings) -> None:
    app.state.ready_checks = {}
    app.state.draining = False
    psutil.cpu_percent(interval=None)  # prime the sampler: the first reading is meaningless

    @app.get("/health", include_in_schema=False)
    async def health() -> dict:
        return {"status": "ok", "service": settings.service_name}

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
        reasons.update(_resource_reasons(settings))
        if reasons:
            message = "; ".join(f"{k}: {v}" for k, v in reasons.items())
            return error_response(503, "not_ready", message, reasons, {"Retry-After": "5"})
        return JSONResponse({"status": "ready", "service": settings.service_name,
                             "checks": {n: "ok" for n in checks}})
