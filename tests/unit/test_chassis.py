"""The chassis contract every service relies on: error shape, health, metrics labels."""
from __future__ import annotations

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from services.chassis.app import create_service_app
from services.chassis.errors import AppError
from services.chassis.health import add_ready_check
from services.chassis.settings import ServiceSettings


class Item(BaseModel):
    name: str
    count: int


def make_app(**overrides) -> FastAPI:
    app = create_service_app(ServiceSettings(service_name="unit", **overrides), title="unit")

    @app.post("/items/{item_id}")
    async def create(item_id: int, item: Item) -> dict:
        if item.count < 0:
            raise AppError(409, "negative", "count must be >= 0", {"count": item.count})
        return {"id": item_id, **item.model_dump()}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")

    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://t")


async def test_malformed_json_is_400_in_error_shape():
    async with client(make_app()) as c:
        r = await c.post("/items/1", content=b'{"name": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "malformed_json"


async def test_missing_field_is_422_naming_the_field():
    async with client(make_app()) as c:
        r = await c.post("/items/1", json={"name": "x"})
    assert r.status_code == 422
    body = r.json()["error"]
    assert body["code"] == "validation_error" and "count" in body["message"]
    assert body["details"][0]["loc"] == ["body", "count"]


async def test_app_error_and_unknown_route_share_the_shape():
    async with client(make_app()) as c:
        conflict = await c.post("/items/1", json={"name": "x", "count": -1})
        missing = await c.get("/nowhere")
    assert conflict.status_code == 409
    assert conflict.json() == {"error": {"code": "negative", "message": "count must be >= 0",
                                         "details": {"count": -1}}}
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_unhandled_error_is_500_without_internals():
    async with client(make_app()) as c:
        r = await c.get("/boom")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal"
    assert "secret" not in r.text


async def test_ready_reports_failing_check_with_reason():
    app = make_app()

    async def broken():
        raise ConnectionError("cannot reach it")

    async with client(app) as c:
        assert (await c.get("/ready")).status_code == 200
        add_ready_check(app, "thing", broken)
        r = await c.get("/ready")
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert "cannot reach it" in r.json()["error"]["details"]["thing"]


async def test_busy_host_is_a_health_detail_never_a_readiness_reason(monkeypatch):
    """Issue 17.1: a node at 100% CPU and 99% memory keeps its replicas in the pool."""
    import psutil

    from services.chassis import health

    monkeypatch.setattr(health, "_cpu_percent", lambda: 100.0)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("vm", (), {"percent": 99.0})())
    async with client(make_app()) as c:
        ready = await c.get("/ready")
        health = (await c.get("/health")).json()
        metrics = (await c.get("/metrics")).text
    assert ready.status_code == 200, ready.text
    assert health["details"]["cpu_percent"] == 100.0 and health["details"]["memory_percent"] == 99.0
    assert 'aistack_host_cpu_percent{service="unit"} 100.0' in metrics


def test_saturation_has_hysteresis():
    """Not ready only after shedding without a break for enter_s; ready again after exit_s quiet."""
    from services.chassis.health import Saturation

    now = [0.0]
    s = Saturation(enter_s=10, exit_s=3, clock=lambda: now[0])
    for t in range(10):  # a 9 s burst of shedding: still ready
        now[0] = float(t)
        s.shed("queue full")
        assert not s.saturated
    now[0] = 10.0
    s.shed("queue full")
    assert s.saturated  # sustained for 10 s
    now[0] = 12.0
    assert s.saturated  # a short pause does not flap
    now[0] = 13.5
    assert not s.saturated  # 3.5 s without shedding: back in the pool
    s.shed("queue full")  # a new burst starts a new episode
    assert not s.saturated


async def test_requests_beyond_max_inflight_are_shed_with_503_and_retry_after():
    import asyncio

    app = make_app(max_inflight=2)
    release, entered = asyncio.Event(), []

    @app.get("/slow")
    async def slow() -> dict:
        entered.append(1)
        await release.wait()
        return {"ok": True}

    async with client(app) as c:
        held = [asyncio.create_task(c.get("/slow")) for _ in range(2)]
        while len(entered) < 2:  # both admitted requests are in flight
            await asyncio.sleep(0.01)
        shed = await c.get("/slow")
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert (await c.get("/ready")).status_code == 200  # one burst never takes it out of the pool
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]


async def test_metrics_label_routes_by_template():
    app = make_app()
    async with client(app) as c:
        await c.post("/items/41", json={"name": "x", "count": 1})
        await c.post("/items/42", json={"name": "x", "count": 1})
        text = (await c.get("/metrics")).text
    assert 'route="/items/{item_id}"' in text
    assert "/items/41" not in text
    assert "aistack_http_request_duration_seconds_bucket" in text


async def test_health_and_openapi():
    async with client(make_app()) as c:
        assert (await c.get("/health")).json()["status"] == "ok"
        assert "/items/{item_id}" in (await c.get("/openapi.json")).json()["paths"]


def test_every_instrumentation_the_services_use_is_active(caplog):
    """Issue 17.3: SQLAlchemy 2.1 silently turned database spans off; the versions installed
    together must keep every instrumentation on, and start-up says which ones are."""
    import logging

    from services.chassis.telemetry import log_instrumentations

    with caplog.at_level(logging.INFO, logger="aistack.telemetry"):
        status = log_instrumentations(exporting=True)
    assert status["sqlalchemy"] == "active", status
    assert status["redis"] == "active" and status["httpx"] == "active", status
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("sqlalchemy" in r.getMessage() for r in caplog.records)
