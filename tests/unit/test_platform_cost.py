"""The per-request platform cost (issue 18): what every service wraps around its routes.

Checked by structure and by what was recorded, never by timing: no BaseHTTPMiddleware, no sync
dependency (a thread-pool hop) on the hot paths, and server spans that are only built for sampled
requests while the trace id still flows.
"""
from __future__ import annotations

import inspect

import httpx
from fastapi import FastAPI
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from starlette.middleware.base import BaseHTTPMiddleware

from services.chassis.app import create_service_app
from services.chassis.settings import ServiceSettings
from services.chassis.telemetry import sampler
from services.chassis.tracing import ServerSpanMiddleware


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://t")


def _dependency_calls(dependant) -> list:
    calls = []
    for sub in dependant.dependencies:
        calls.append(sub.call)
        calls += _dependency_calls(sub)
    return calls


def _routes(routes) -> list:
    """Flattened (FastAPI keeps included routers as one lazy route each)."""
    out = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += _routes(inner.routes) if inner is not None else [route]
    return out


def _sync_dependencies(app: FastAPI, path: str, method: str = "POST") -> list[str]:
    for route in _routes(app.router.routes):
        if getattr(route, "path", None) == path and method in getattr(route, "methods", ()):
            return [c.__qualname__ for c in _dependency_calls(route.dependant)
                    if not (inspect.iscoroutinefunction(c) or inspect.iscoroutinefunction(vars(type(c)).get("__call__")))]
    raise AssertionError(f"no route {method} {path}")


def test_the_chassis_uses_no_base_http_middleware():
    app = create_service_app(ServiceSettings(service_name="unit"), title="unit")
    classes = [m.cls for m in app.user_middleware]
    assert classes and not [c for c in classes if isinstance(c, type) and issubclass(c, BaseHTTPMiddleware)]


def test_fastapi_native_telemetry_is_off():
    """A second server span per request, built before sampling: the chassis has its own."""
    app = create_service_app(ServiceSettings(service_name="unit"), title="unit")
    native = getattr(app, "_native_telemetry", None)
    assert native is None or not native.enabled()


def test_hot_paths_have_no_sync_dependency(tmp_path):
    from services.model.app import create_app as model_app
    from services.model.settings import ModelSettings
    from services.orchestrator.app import create_app as orchestrator_app

    model = model_app(ModelSettings(repository=tmp_path))
    assert _sync_dependencies(model, "/v2/models/{model}/versions/{version}/infer") == []
    assert _sync_dependencies(model, "/v2/models/{model}/infer") == []
    orchestrator = orchestrator_app()
    assert _sync_dependencies(orchestrator, "/v1/predict/{model}") == []
    from services.gateway.app import create_app as gateway_app

    gateway = gateway_app()
    for route in _routes(gateway.router.routes):
        if hasattr(route, "dependant"):
            assert _sync_dependencies(gateway, route.path, next(iter(route.methods))) == [], route.path


class Recorder(SpanProcessor):
    def __init__(self):
        self.ended = []

    def on_end(self, span) -> None:
        self.ended.append(span)


def _traced_app(sampling) -> tuple[FastAPI, Recorder]:
    provider, recorder = TracerProvider(sampler=sampling), Recorder()
    provider.add_span_processor(recorder)
    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: str) -> dict:
        return {"item": item}

    app.add_middleware(ServerSpanMiddleware, excluded=frozenset({"/health"}), tracer_provider=provider)
    return app, recorder


async def test_unsampled_requests_build_no_span_but_keep_their_trace_id():
    app, recorder = _traced_app(ParentBased(ALWAYS_OFF))
    async with _client(app) as client:
        r = await client.get("/items/a")
        assert r.status_code == 200 and len(r.headers["x-trace-id"]) == 32
        # The caller's trace id is kept (unsampled flag): logs and X-Trace-Id still name it.
        parent = "0af7651916cd43dd8448eb211c80319c"
        r = await client.get("/items/b", headers={"traceparent": f"00-{parent}-b7ad6b7169203331-00"})
        assert r.headers.get_list("x-trace-id") == [parent]
    assert recorder.ended == []


async def test_sampled_requests_record_a_server_span_with_its_route():
    app, recorder = _traced_app(ParentBased(TraceIdRatioBased(0.0)))
    parent = "0af7651916cd43dd8448eb211c80319c"
    async with _client(app) as client:
        await client.get("/items/a")  # a new trace at ratio 0: not recorded
        r = await client.get("/items/b", headers={"traceparent": f"00-{parent}-b7ad6b7169203331-01"})
        assert r.headers["x-trace-id"] == parent
    [span] = recorder.ended
    assert span.name == "GET /items/{item}" and span.kind.name == "SERVER"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert span.attributes["http.route"] == "/items/{item}" and span.attributes["http.response.status_code"] == 200


def test_sampler_follows_the_exporter_and_the_environment(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    assert "AlwaysOff" in sampler(False).get_description()
    assert "TraceIdRatioBased{0.25}" in sampler(True).get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    assert sampler(True) is None  # the SDK applies the standard variable itself
