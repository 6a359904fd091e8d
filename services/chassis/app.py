"""create_service_app: the one place a service's FastAPI app gets its platform parts."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import FastAPI

from .errors import install_error_handlers
from .health import install_health
from .logs import setup_logging
from .metrics import install_metrics
from .settings import ServiceSettings
from .telemetry import instrument_app, setup_tracing, shutdown_tracing

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
            shutdown_tracing()

    app = FastAPI(title=title, description=description, version="0.1.0", lifespan=_lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    install_health(app, settings)
    install_metrics(app, settings.service_name)
    instrument_app(app)
    return app


def run(app_factory: Callable[[], FastAPI], settings: ServiceSettings) -> None:
    """Serve an app with uvicorn: what each service's __main__ calls."""
    import uvicorn

    uvicorn.run(app_factory(), host=settings.host, port=settings.port, log_config=None,
                timeout_graceful_shutdown=10)
