"""The server span of each request, as one pure ASGI middleware that costs next to nothing unsampled.

OpenTelemetry's ASGI/FastAPI instrumentation collects request attributes, wraps every
receive/send in spans and cleans attributes before it knows whether the span is sampled: a
third of a cheap model server's CPU (issue 18). Here the sampling decision comes first:

- the caller's W3C `traceparent` (and `tracestate`) is read straight from the ASGI headers;
- the span starts with the name and kind only; an unsampled span is the SDK's non-recording
  span (a trace id, a span id, a context switch: microseconds), so logs and the `X-Trace-Id`
  header still carry the trace id and outbound calls still propagate it;
- attributes (method, route, status, ...) are built only when the span records.

Which requests record is the sampler's choice (see telemetry.sampler): parent-based, a ratio of
new traces when an exporter is configured, none when nothing would receive them.
"""
from __future__ import annotations

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_PROPAGATION = (b"traceparent", b"tracestate", b"baggage")
_TRACE_ID_HEADER = b"x-trace-id"


class ServerSpanMiddleware:
    """One SERVER span per HTTP request (except `excluded` paths), its trace id in X-Trace-Id.

    An upstream's X-Trace-Id (the gateway relays the orchestrator's headers) is replaced, never
    duplicated.
    """

    def __init__(self, app: ASGIApp, excluded: frozenset[str] = frozenset(), tracer_provider=None):
        self.app, self.excluded = app, excluded
        self.tracer = trace.get_tracer("aistack.server", tracer_provider=tracer_provider)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.excluded:
            return await self.app(scope, receive, send)
        carrier = None
        for name, value in scope["headers"]:
            if name in _PROPAGATION:
                if carrier is None:
                    carrier = {}
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        parent = propagate.extract(carrier) if carrier else None
        method = scope["method"]
        span = self.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        token = context.attach(trace.set_span_in_context(span, parent))
        recording = span.is_recording()
        ctx = span.get_span_context()
        trace_id = format(ctx.trace_id, "032x").encode() if ctx.is_valid else None
        status = 500

        async def send_with_trace_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if trace_id is not None:
                    headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _TRACE_ID_HEADER]
                    headers.append((_TRACE_ID_HEADER, trace_id))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace_id)
        except BaseException as exc:
            if recording:
                span.record_exception(exc)
            raise
        finally:
            if recording:
                _finish(span, scope, method, status)
            context.detach(token)
            span.end()


def _finish(span, scope: Scope, method: str, status: int) -> None:
    """Only sampled spans pay for attributes (stable HTTP semantic conventions)."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if template:
        span.update_name(f"{method} {template}")
        span.set_attribute("http.route", template)
    client = scope.get("client")
    server = scope.get("server")
    attributes = {
        "http.request.method": method,
        "url.scheme": scope.get("scheme", "http"),
        "url.path": scope.get("path", ""),
        "network.protocol.version": scope.get("http_version", "1.1"),
        "http.response.status_code": status,
    }
    if client:
        attributes["client.address"] = client[0]
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1] or 0
    for name, value in scope["headers"]:
        if name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
            break
    span.set_attributes(attributes)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
