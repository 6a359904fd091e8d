from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.chassis.app import create_service_app
from services.chassis.health import add_ready_check
from services.chassis.limits import set_body_limit

from .api import router
from .repository_api import admin as repository_admin
from .repository_api import baselines, close_versions
from .repository_api import router as repository_router
from .runtimes import RuntimeOptions
from .service import DataPlane
from .settings import ModelSettings

log = logging.getLogger("aistack.model")


async def _poll_repository(plane: DataPlane, every_s: float) -> None:
    """Serve versions that reached the shared repository through another replica's load."""
    while True:
        await asyncio.sleep(every_s)
        try:
            for name in await asyncio.to_thread(plane.changed):
                async with plane.repository_lock:
                    await close_versions(await asyncio.to_thread(plane.rescan, name))
        except Exception:  # a bad scan must not end the loop; the next tick tries again
            log.exception("repository poll failed")


def create_app(settings: ModelSettings | None = None) -> FastAPI:
    settings = settings or ModelSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        options = RuntimeOptions(device=settings.device, fp16=settings.fp16, threads=settings.threads)
        plane = DataPlane(settings.repository, options, dynamic_batching=settings.dynamic_batching,
                          max_queue_size=settings.max_queue_size)
        # Loading (hashing, torch imports) takes seconds: keep the loop free meanwhile.
        await asyncio.to_thread(plane.load_all)
        app.state.plane = plane

        async def models_loaded():
            if not plane.all_ready:
                bad = [f"{m['name']}/{m['version']}: {m['reason'] or 'unavailable'}"
                       for m in plane.index() if m["state"] != "READY"] or ["repository is empty"]
                raise RuntimeError("; ".join(bad))

        add_ready_check(app, "models", models_loaded)
        poller = (asyncio.create_task(_poll_repository(plane, settings.repository_poll_s))
                  if settings.repository_poll_s > 0 else None)
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
            await plane.close()

    app = create_service_app(settings, title="aistack model server",
                             description="Open Inference Protocol v2 model server.", lifespan=lifespan)
    app.include_router(router)
    app.include_router(repository_router)
    app.include_router(repository_admin)
    app.include_router(baselines)
    # A load may carry a new version's files (base64 in JSON): its own, larger body limit.
    set_body_limit(app, "/v2/repository/models/", settings.upload_max_bytes)
    return app
