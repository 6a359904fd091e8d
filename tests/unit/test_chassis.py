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
    # CPU saturation of the test machine must not decide these tests; one test sets it on purpose.
    overrides = {"ready_max_cpu_percent": 100.0, **overrides}
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


async def test_ready_reports_memory_saturation():
    async with client(make_app(ready_max_memory_percent=0.0)) as c:
        r = await c.get("/ready")
    assert r.status_code == 503 and "memory" in r.json()["error"]["details"]


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
