"""create_service_app: the one place a service's FastAPI app gets its platform parts."""
from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from .errors import install_error_handlers
from .health import install_health, mark_draining
from .limits import install_body_limit
from .logs import setup_logging
from .metrics import install_metrics
from .settings import ServiceSettings
from .telemetry import instrument_app, setup_tracing, shutdown_tracing

log = logging.getLogger("aistack.shutdown")
# FastAPI >= 0.16x traces, meters and logs every request itself once a tracer provider is set: a
# second server span per request, built before any sampling decision. The chassis' own pure ASGI
# middleware (tracing.py) is the one server span; Prometheus (metrics.py) the one request metric.
_NO_NATIVE_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
                        if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})
Lifespan = Callable[[FastAPI], "AsyncIterator[None]"]


def create_service_app(settings: ServiceSettings, *, title: str, description: str = "",
                       lifespan: Callable | None = None) -> FastAPI:
    """Build an app with logging, tracing, metrics, health and errors; `lifespan` adds resources.

    Nothing happens at import time: tests build apps with their own settings.
    """
    setup_logging(settings.service_name, settings.log_level)
    setup_tracing(settings.service_name)

    @asynccontextmanager
    async def _lifespan(app: FastAPI):
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            mark_draining(app)
            shutdown_tracing()

    app = FastAPI(title=title, description=description, version="0.1.0", lifespan=_lifespan, **_NO_NATIVE_TELEMETRY)
    app.state.settings = settings
    install_error_handlers(app)
    install_body_limit(app, settings.max_body_bytes)
    install_health(app, settings)
    install_metrics(app, settings.service_name)
    instrument_app(app)
    return app


def run(app_factory: Callable[[], FastAPI], settings: ServiceSettings) -> None:
    """Serve an app with uvicorn: what each service's __main__ calls.

    Graceful shutdown. On SIGTERM (or SIGINT) the service first drains: /ready answers 503 while
    it keeps serving for SHUTDOWN_DRAIN_S seconds (default 0; Kubernetes sets a few seconds, the
    time endpoints take to drop the pod), then uvicorn stops accepting connections, finishes
    the requests in flight (up to SHUTDOWN_TIMEOUT_S, default 20), runs the lifespan shutdown
    and exits. A second signal skips the drain.
    """
    tls = tls_options(settings)
    app = app_factory()
    # proxy_headers=False: uvicorn would otherwise rewrite the client address from X-Forwarded-For
    # sent by 127.0.0.1 (any local caller); services/chassis/clientip.py applies the trusted list.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, proxy_headers=False,
                            timeout_graceful_shutdown=_env_float("SHUTDOWN_TIMEOUT_S", 20.0), **tls)
    DrainingServer(config, app, drain_s=_env_float("SHUTDOWN_DRAIN_S", 0.0)).run()


def tls_options(settings: ServiceSettings) -> dict:
    """uvicorn's ssl_* arguments from the TLS settings; {} for plain HTTP.

    Fails at start, naming the variables, when only one of certificate and key is set, when a file
    is missing, or when TLS is required (<PREFIX>REQUIRE_TLS) and not configured: a service that
    should be encrypted never silently comes up in plain HTTP.
    """
    cert, key = settings.tls_certfile, settings.tls_keyfile
    prefix = (settings.model_config.get("env_prefix") or "").upper()
    if not cert and not key:
        if settings.require_tls:
            raise RuntimeError(f"{settings.service_name}: {prefix}REQUIRE_TLS is set but {prefix}TLS_CERTFILE "
                               f"and {prefix}TLS_KEYFILE are not; refusing to serve plain HTTP")
        return {}
    if not cert or not key:
        raise RuntimeError(f"{settings.service_name}: TLS needs both {prefix}TLS_CERTFILE and {prefix}TLS_KEYFILE")
    for name, path in (("TLS_CERTFILE", cert), ("TLS_KEYFILE", key)):
        if not os.path.isfile(path):
            raise RuntimeError(f"{settings.service_name}: {prefix}{name} {path!r} is not a readable file")
    return {"ssl_certfile": cert, "ssl_keyfile": key, "ssl_keyfile_password": settings.tls_keyfile_password}


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal starts a drain instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float):
        super().__init__(config)
        self.app, self.drain_s, self._draining = app, drain_s, False

    def handle_exit(self, sig, frame) -> None:
        mark_draining(self.app)
        if self._draining or self.drain_s <= 0 or self.should_exit:
            return super().handle_exit(sig, frame)
        self._draining = True
        log.info("signal %s: draining for %.1fs (/ready answers 503), then stopping", sig, self.drain_s)
        # Then exit exactly as plain uvicorn would have on this signal.
        timer = threading.Timer(self.drain_s, super().handle_exit, (sig, None))
        timer.daemon = True
        timer.start()
