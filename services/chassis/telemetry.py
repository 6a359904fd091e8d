"""OpenTelemetry setup: W3C trace context everywhere, OTLP export when an endpoint is configured.

One trace per request: the FastAPI server span of each service is the child of the caller's
httpx client span (``traceparent`` on every hop), Celery tasks continue the trace of whoever
published them (context in the task headers), every response carries the trace id in
``X-Trace-Id`` and every log line carries it in ``trace_id`` (see logs.py).
"""
from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

EXCLUDED_URLS = "/health,/ready,/metrics"
TRACE_ID_HEADER = "X-Trace-Id"
# Span attributes the prediction path sets with annotate(); the dashboards and docs/metrics.md
# use these names, so keep them stable.
SPAN_ATTRIBUTES = {
    "model": "aistack.model.name",
    "version": "aistack.model.version",
    "cache_hit": "aistack.cache.hit",
    "batch_size": "aistack.batch.size",
    "device": "aistack.model.device",
    "principal": "aistack.principal",
}
_configured = False


def setup_tracing(service: str) -> None:
    """Install the process-wide tracer provider once (OTel forbids replacing it)."""
    global _configured
    if _configured:
        return
    _configured = True
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    exporting = exporter_configured()
    provider = TracerProvider(resource=resource, sampler=sampler(exporting))
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    # Client libraries: every outbound httpx and redis call becomes a child span.
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    HTTPXClientInstrumentor().instrument()  # also what carries traceparent to the next service
    if exporting:  # Redis spans only matter where someone receives them
        RedisInstrumentor().instrument()
    setup_log_export()
    log_instrumentations(exporting)


def setup_log_export() -> bool:
    """With OTEL_LOGS_EXPORTER=otlp (compose and k8s set it), every log record also goes over OTLP
    to the collector, and from there to Loki, carrying its trace and span ids natively, so Grafana
    links a Jaeger trace to its log lines and back. Records are scrubbed as on stdout (logs.py)."""
    if os.environ.get("OTEL_LOGS_EXPORTER", "").strip().lower() != "otlp" or not exporter_configured():
        return False
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    from .logs import RedactingFilter

    service = os.environ.get("OTEL_SERVICE_NAME", "aistack")
    provider = LoggerProvider(resource=Resource.create({"service.name": service}))
    provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
    set_logger_provider(provider)
    handler = LoggingHandler(logger_provider=provider)
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    return True


# What each instrumentation instruments; a version outside its range makes OpenTelemetry skip it
# with nothing more than a log line, which is how database spans once vanished (issue 17.3).
INSTRUMENTATIONS = {
    "httpx": "opentelemetry.instrumentation.httpx.HTTPXClientInstrumentor",
    "redis": "opentelemetry.instrumentation.redis.RedisInstrumentor",
    "sqlalchemy": "opentelemetry.instrumentation.sqlalchemy.SQLAlchemyInstrumentor",
    "celery": "opentelemetry.instrumentation.celery.CeleryInstrumentor",
}


def instrumentation_status() -> dict[str, str]:
    """name -> "active", "not installed" (the service does not use that library), or why it is off."""
    import importlib
    import importlib.util

    from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

    status = {}
    for name, path in INSTRUMENTATIONS.items():
        if importlib.util.find_spec(name) is None:
            status[name] = "not installed"
            continue
        module, _, cls = path.rpartition(".")
        try:
            instrumentor = getattr(importlib.import_module(module), cls)()
        except ImportError as exc:
            status[name] = f"off: {exc}"
            continue
        conflict = get_dependency_conflicts(instrumentor.instrumentation_dependencies())
        status[name] = f"off: {conflict}" if conflict else "active"
    return status


def log_instrumentations(exporting: bool) -> dict[str, str]:
    """Say once, at start, which instrumentations can produce spans; a WARNING names any that a
    version mismatch turned off (OpenTelemetry itself would only skip it quietly)."""
    log = logging.getLogger("aistack.telemetry")
    status = instrumentation_status()
    if not exporting and status.get("redis") == "active":
        status["redis"] = "unused without an exporter"
    active = [n for n, s in status.items() if s == "active"]
    log.info("tracing: %s; instrumentations active: %s",
             "exporting over OTLP" if exporting else "no exporter (trace ids in logs only)",
             ", ".join(active), extra={"instrumentations": status})
    for name, state in status.items():
        if state.startswith("off"):
            log.warning("OpenTelemetry %s instrumentation is %s: its spans are missing", name, state)
    return status


def exporter_configured() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def sampler(exporting: bool):
    """Parent-based: a caller's decision (the traceparent flag) is followed. New traces: the share
    OTEL_TRACES_SAMPLER_ARG (default 0.1) with an exporter, none without one (trace ids still flow
    into logs and X-Trace-Id). OTEL_TRACES_SAMPLER, when set, is the SDK's to apply (None)."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

    if os.environ.get("OTEL_TRACES_SAMPLER"):
        return None
    if not exporting:
        return ParentBased(ALWAYS_OFF)
    try:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG") or 0.1)
    except ValueError:
        ratio = 0.1
    return ParentBased(TraceIdRatioBased(min(1.0, max(0.0, ratio))))


def instrument_app(app) -> None:
    """Server spans by the chassis' own pure ASGI middleware (services/chassis/tracing.py), which
    decides sampling before building anything; it also answers X-Trace-Id."""
    from .tracing import ServerSpanMiddleware

    app.add_middleware(ServerSpanMiddleware, excluded=frozenset(EXCLUDED_URLS.split(",")))


def instrument_engine(engine) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    SQLAlchemyInstrumentor().instrument(engine=engine.sync_engine)


def instrument_celery() -> None:
    """Trace Celery on both sides: publishing injects the context into the task headers, the
    worker continues it. Idempotent; spans go to whatever provider the process installs."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.force_flush()


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def annotate(**attributes) -> None:
    """Put prediction facts on the current span: annotate(model="fraud", version="2",
    cache_hit=False, batch_size=8). Known keys map to SPAN_ATTRIBUTES, others to aistack.<key>."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(SPAN_ATTRIBUTES.get(key, f"aistack.{key}"), value)


class TraceIdHeaderMiddleware:
    """Answer every traced request with its trace id, so a user can quote it and find the trace.

    Pure ASGI (no body buffering). It runs inside the OpenTelemetry middleware, so the current
    span is the request's server span; an upstream's X-Trace-Id (the gateway relays the
    orchestrator's headers) is replaced, never duplicated.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_trace_id(message):
            if message["type"] == "http.response.start":
                trace_id = current_trace_id()
                if trace_id:
                    name = TRACE_ID_HEADER.lower().encode()
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != name]
                    headers.append((name, trace_id.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_trace_id)


tracer = trace.get_tracer("aistack")
