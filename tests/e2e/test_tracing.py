"""One trace per request, across real processes, exported over OTLP/HTTP to a receiver in the test.

The stack runs as separate processes (services/cli/stack.py) with OTEL_EXPORTER_OTLP_ENDPOINT
pointing at a small OTLP/HTTP server here that decodes opentelemetry-proto's
ExportTraceServiceRequest: what the OpenTelemetry Collector would receive. The assertions are on
what the services really exported: trace ids, span kinds and parent links.
"""
from __future__ import annotations

import gzip
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import STACK_ENV, claimed_redis_db, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ROW = {"amount": 250.0, "txn_count_24h": 5, "txn_amount_24h": 400.0, "avg_amount_30d": 40.0,
       "account_age_days": 30, "chargebacks_90d": 1, "distinct_merchants_7d": 6}
SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # opentelemetry.proto.trace.v1.Span.SpanKind


def fresh_row() -> dict:
    """Inputs no earlier request used, so the orchestrator's cache cannot answer for the model."""
    return {**ROW, "amount": 100.0 + secrets.randbelow(10**6) / 100}


# -- an OTLP/HTTP trace receiver ------------------------------------------------------------------
@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    attributes: dict = field(default_factory=dict)


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpReceiver:
    """POST /v1/traces with a protobuf ExportTraceServiceRequest, as the OTLP/HTTP exporter sends."""

    def __init__(self):
        self.spans: list[Span] = []
        self.logs: list[tuple[str, str, str, str]] = []  # (service, trace id, severity, body)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest,
                    ExportTraceServiceResponse,
                )

                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/logs":  # OTEL_LOGS_EXPORTER=otlp: what Loki gets via the collector
                    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
                        ExportLogsServiceRequest,
                    )

                    receiver._add_logs(ExportLogsServiceRequest.FromString(body))
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                receiver._add(request)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _add(self, request) -> None:
        spans = []
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(res.get("service.name", "?"), s.trace_id.hex(), s.span_id.hex(),
                                      s.parent_span_id.hex() or None, s.name, s.kind,
                                      {a.key: _value(a.value) for a in s.attributes}))
        with self.lock:
            self.spans.extend(spans)

    def _add_logs(self, request) -> None:
        records = []
        for rl in request.resource_logs:
            res = {a.key: _value(a.value) for a in rl.resource.attributes}
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    records.append((res.get("service.name", "?"), r.trace_id.hex(), r.severity_text,
                                    _value(r.body) or ""))
        with self.lock:
            self.logs.extend(records)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, trace_id: str, done, limit: float = 60.0) -> list[Span]:
        """Spans of the trace once done(spans) holds (exporters batch; the limit only ends a broken run)."""
        deadline = time.monotonic() + limit
        while True:
            spans = self.trace(trace_id)
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                pytest.fail(f"trace {trace_id} incomplete:\n" + describe(spans))
            time.sleep(0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def describe(spans: list[Span]) -> str:
    return "\n".join(f"{s.service:16} {s.kind} {s.span_id} <- {s.parent_id} {s.name}" for s in spans)


def server_spans(spans: list[Span], service: str) -> list[Span]:
    return [s for s in spans if s.service == service and s.kind == SERVER]


def _port_of(span: Span) -> int | None:
    url = span.attributes.get("url.full") or span.attributes.get("http.url")
    if url:
        return urlsplit(url).port
    port = span.attributes.get("server.port") or span.attributes.get("net.peer.port")
    return int(port) if port else None


def assert_one_connected_trace(spans: list[Span], ports: dict[str, int]) -> None:
    """One root; every other span's parent is in the trace; every call from one of our services
    to another is a CLIENT span whose child is the callee's SERVER span."""
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_id is None]
    assert len(roots) == 1, "expected one root span:\n" + describe(spans)
    dangling = [s for s in spans if s.parent_id and s.parent_id not in by_id]
    assert not dangling, "spans whose parent is not in the trace:\n" + describe(dangling)
    for s in spans:
        if s.kind == SERVER and s.parent_id:
            parent = by_id[s.parent_id]
            assert parent.kind == CLIENT and parent.service != s.service, (
                f"{s.service} server span {s.name!r} has parent {parent.service} {parent.name!r}")
    service_by_port = {port: name for name, port in ports.items()}
    for s in spans:
        callee = service_by_port.get(_port_of(s)) if s.kind == CLIENT else None
        if callee:
            children = [c for c in spans if c.parent_id == s.span_id and c.kind == SERVER]
            assert [c.service for c in children] == [callee], (
                f"{s.service} called {callee} ({s.name!r}) but {callee}'s server span is not its child:\n"
                + describe(spans))


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _uninstrumented_httpx():
    """An in-process app of another test module may have instrumented httpx in this process;
    here the test must be the trace's outside caller, not a span that is never exported."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    was = instrumentor.is_instrumented_by_opentelemetry
    if was:
        instrumentor.uninstrument()
    yield
    if was:
        instrumentor.instrument()


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def own_redis_url(redis_server_url):
    with claimed_redis_db(redis_server_url) as url:
        yield url


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory, database_url, own_redis_url, models_dir, receiver):
    from services.cli.stack import DEFAULT_PORTS, Stack

    data_dir = tmp_path_factory.mktemp("traced-stack")
    (data_dir / "models").symlink_to(models_dir)
    s = Stack(data_dir, database_url=database_url, redis_url=own_redis_url,
              ports={name: free_port() for name in DEFAULT_PORTS},
              extra_env={**STACK_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
                         "OTEL_TRACES_SAMPLER": "parentbased_always_on", "OTEL_LOGS_EXPORTER": "otlp"})
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def headers(traced_stack) -> dict:
    """The traced stack's own admin: the gateway requires a token for predictions."""
    from tests.e2e.conftest import login

    r = login(traced_stack.url("gateway"), traced_stack.admin_email, traced_stack.admin_password)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


# -- tests ----------------------------------------------------------------------------------------
def test_one_trace_spans_every_service_a_prediction_visits(traced_stack, receiver, headers):
    r = httpx.post(f"{traced_stack.url('gateway')}/v1/predict/fraud", json={"inputs": fresh_row()},
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-trace-id"]
    assert len(trace_id) == 32 and int(trace_id, 16)

    required = ("gateway", "orchestrator", "model")
    spans = receiver.wait_for(trace_id, lambda spans: all(server_spans(spans, n) for n in required))
    # Give late exporters (features, auth, redis spans) their batch interval, then judge the whole.
    time.sleep(1.0)
    spans = receiver.trace(trace_id)
    assert_one_connected_trace(spans, traced_stack.ports)

    root = next(s for s in spans if s.parent_id is None)
    assert root.service == "gateway" and root.kind == SERVER
    gateway, orchestrator, model = (server_spans(spans, n)[0] for n in required)
    # gateway -> orchestrator -> model, each hop a client span of the caller.
    spans_by_id = {s.span_id: s for s in spans}
    assert spans_by_id[orchestrator.parent_id].service == "gateway"
    assert spans_by_id[model.parent_id].service == "orchestrator"
    for s in (gateway, orchestrator):
        assert s.attributes.get("http.route", "").startswith("/v1/predict"), s.attributes

    # The same id is in the response header and in the services' log lines for this request.
    for name in ("gateway", "orchestrator"):
        lines = [json.loads(line) for line in (traced_stack.data_dir / "logs" / f"{name}.log").read_text()
                 .splitlines() if line.startswith("{")]
        assert all("trace_id" in line for line in lines), name
        assert any(line["trace_id"] == trace_id for line in lines), f"no {name} log line with the trace id"


def test_trace_header_is_the_callers_trace_when_it_sends_traceparent(traced_stack, receiver, headers):
    trace_id = secrets.token_hex(16)
    parent = secrets.token_hex(8)
    headers = {**headers, "traceparent": f"00-{trace_id}-{parent}-01"}
    r = httpx.post(f"{traced_stack.url('gateway')}/v1/predict/fraud", json={"inputs": fresh_row()}, headers=headers,
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-trace-id"] == trace_id
    assert r.headers.get_list("x-trace-id") == [trace_id]  # the relayed upstream header is not doubled
    spans = receiver.wait_for(trace_id, lambda spans: server_spans(spans, "model") and server_spans(spans, "gateway"))
    assert server_spans(spans, "gateway")[0].parent_id == parent


PUBLISHER = """
import sys
from opentelemetry import trace
from services.chassis.telemetry import setup_tracing, tracer
from services.pipeline.celery_app import create_celery
from services.pipeline.settings import PipelineSettings

setup_tracing("test-client")
celery = create_celery(PipelineSettings(redis_url=sys.argv[1]))
with tracer.start_as_current_span("submit-job") as span:
    result = celery.send_task("pipeline.score_rows", args=["fraud", [ROW]], kwargs={"version": "2"})
    out = result.get(timeout=60)
    print(format(span.get_span_context().trace_id, "032x"))
trace.get_tracer_provider().shutdown()
""".replace("ROW", repr(ROW))


def test_a_celery_task_continues_the_trace_of_whoever_published_it(traced_stack, receiver):
    """The publisher (here a process of its own, as a service would be) injects the context into the
    task headers; the worker's run span is the child of the publish span, and the worker's call to
    the model server is a child of the run span."""
    # Every trace, as in the stack above (the default samples a share of new traces).
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "test-client",
           "OTEL_TRACES_SAMPLER": "parentbased_always_on"}
    done = subprocess.run([sys.executable, "-c", PUBLISHER, traced_stack.redis_url], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    trace_id = done.stdout.strip().splitlines()[-1]

    def complete(spans):
        return server_spans(spans, "model") and any(s.kind == CONSUMER for s in spans)

    spans = receiver.wait_for(trace_id, complete)
    time.sleep(1.0)
    spans = receiver.trace(trace_id)
    assert_one_connected_trace(spans, traced_stack.ports)
    by_id = {s.span_id: s for s in spans}
    publish = next(s for s in spans if s.kind == PRODUCER)
    run = next(s for s in spans if s.kind == CONSUMER)
    assert publish.service == "test-client" and by_id[publish.parent_id].name == "submit-job"
    assert run.service == "pipeline-worker" and run.parent_id == publish.span_id
    assert run.name.endswith("pipeline.score_rows")
    model = server_spans(spans, "model")
    assert model and all(by_id[by_id[m.parent_id].parent_id].span_id == run.span_id for m in model)


def test_spans_carry_model_version_cache_hit_and_batch_size(traced_stack, receiver, headers):
    from services.chassis.telemetry import SPAN_ATTRIBUTES as A

    r = httpx.post(f"{traced_stack.url('gateway')}/v1/predict/fraud", json={"inputs": fresh_row()},
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    receiver.wait_for(r.headers["x-trace-id"],
                      lambda spans: all(server_spans(spans, n) for n in ("orchestrator", "model")))
    time.sleep(1.0)
    attributes = {}
    for s in receiver.trace(r.headers["x-trace-id"]):
        attributes.update(s.attributes)
    assert attributes.get(A["model"]) == "fraud"
    assert attributes.get(A["version"]) == r.json()["version"]
    assert attributes.get(A["cache_hit"]) is r.json()["cached"]
    assert attributes.get(A["batch_size"], 0) >= 1


def test_a_prediction_trace_has_database_and_redis_spans(traced_stack, receiver, headers):
    """Issue 17.3: with SQLAlchemy out of its instrumentation's range no database span was ever
    exported, and nothing noticed. A first call with a new API key makes the gateway introspect
    it at auth (a Postgres query); the gateway's rate limit and the orchestrator's cache are Redis."""
    gw = traced_stack.url("gateway")
    r = httpx.post(f"{gw}/admin/api-keys", headers=headers, timeout=30,
                   json={"name": f"trace-{secrets.token_hex(4)}", "role": "service"})
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{gw}/v1/predict/fraud", json={"inputs": fresh_row()}, timeout=30,
                   headers={"Authorization": f"Bearer {r.json()['key']}"})
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-trace-id"]

    def db(spans, system):
        return [s for s in spans if s.attributes.get("db.system") == system
                or s.attributes.get("db.system.name") == system]

    spans = receiver.wait_for(trace_id, lambda spans: db(spans, "postgresql") and db(spans, "redis"))
    assert any(s.service == "auth" for s in db(spans, "postgresql")), describe(spans)
    assert {s.kind for s in db(spans, "postgresql") + db(spans, "redis")} == {CLIENT}

    # And each service said at start which instrumentations are on.
    for name in ("auth", "orchestrator", "features", "gateway"):
        lines = [json.loads(line) for line in (traced_stack.data_dir / "logs" / f"{name}.log").read_text()
                 .splitlines() if line.startswith("{")]
        report = next(line for line in lines if line.get("logger") == "aistack.telemetry")
        assert report["instrumentations"]["sqlalchemy"] == "active", report
        assert report["instrumentations"]["redis"] == "active", report


def test_log_records_go_over_otlp_with_their_trace_id(traced_stack, receiver, headers):
    """Issue 17.6: compose and k8s ship logs over OTLP to the collector (and on to Loki); each
    record carries the trace id natively, which is what links a Jaeger trace to its log lines."""
    r = httpx.post(f"{traced_stack.url('gateway')}/v1/predict/fraud", json={"inputs": fresh_row()},
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-trace-id"]
    deadline = time.monotonic() + 60
    while True:
        with receiver.lock:
            services = {service for service, tid, _, _ in receiver.logs if tid == trace_id}
        if {"gateway", "orchestrator", "model"} <= services or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"gateway", "orchestrator", "model"} <= services, services  # the row needs no features call
    with receiver.lock:
        bodies = [body for _, tid, _, body in receiver.logs if tid == trace_id]
    assert not any("Bearer ey" in body for body in bodies)  # scrubbed as on stdout
