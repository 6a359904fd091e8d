"""Routes built from the route table (routes.py): each one authenticates, checks its scope,
rate-limits and proxies through Gateway.handle."""
from __future__ import annotations

import hmac
import inspect
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from services.chassis.errors import AppError
from services.chassis.internal import INTERNAL_HEADER

from .deps import ClientIP, GatewayDep
from .routes import ROUTES, Route

router = APIRouter()
# Served by the gateway itself (app.py includes these before the route table's catch-alls).
overview_router = APIRouter(tags=["admin"])
admin_ui_router = APIRouter(include_in_schema=False)
OVERVIEW_ROUTE = Route("/admin/overview", ("GET",), "gateway", "admin", summary="Admin overview")
STATIC_DIR = Path(__file__).with_name("static")
# The admin page loads only its own files; no inline script, nothing from elsewhere.
UI_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                         "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                                         "base-uri 'none'; form-action 'self'",
              "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@overview_router.get("/admin/overview", summary="Admin overview: services, traffic, models, jobs")
async def overview(request: Request, gateway: GatewayDep, ip: ClientIP) -> JSONResponse:
    """Each service and replica with health and version; requests per second, p50/p95 latency, error
    rate and cache hit ratio over the last minute, with a series over the last minutes; models,
    versions and their traffic policy; running and recent jobs. Scope: admin."""
    principal = await gateway.principal(OVERVIEW_ROUTE, request.headers, ip)
    limit_headers = await gateway.limit(OVERVIEW_ROUTE, principal, b"")
    upstream = gateway.upstream_headers(OVERVIEW_ROUTE, {}, principal, ip)
    doc = await request.app.state.overview.snapshot(upstream)
    return JSONResponse(doc, headers={**limit_headers, "Cache-Control": "no-store"})


OPERATOR_ROUTE = Route("/metrics", ("GET",), "gateway", "admin", summary="Operators only")
# Served by every service for its operators; at the public entry point they are not for everyone.
OPERATOR_PATHS = frozenset({"/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def guard_operator_routes(app) -> None:
    """/metrics and /openapi.json answer only the internal token (Prometheus, the overview) or an
    admin credential; the interactive docs pages are not served by the gateway at all."""
    from starlette.routing import Route as StarletteRoute

    guarded = {}
    for route in list(app.router.routes):
        if isinstance(route, StarletteRoute) and route.path in OPERATOR_PATHS:
            app.router.routes.remove(route)
            guarded[route.path] = route.endpoint

    async def operator(request: Request, gateway: GatewayDep, ip: ClientIP):
        presented = request.headers.get(INTERNAL_HEADER)
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if not presented and scheme.lower() == "bearer":  # Prometheus' `authorization` scrape option
            presented = bearer.strip()
        expected = request.app.state.settings.internal_token
        if not (presented and expected and hmac.compare_digest(presented.encode(), expected.encode())):
            await gateway.principal(OPERATOR_ROUTE, request.headers, ip)
        handler = guarded[request.url.path]
        return await (handler(request) if inspect.signature(handler).parameters else handler())

    for path in ("/metrics", "/openapi.json"):
        if path in guarded:
            app.add_api_route(path, operator, methods=["GET"], include_in_schema=False)


@admin_ui_router.get("/admin")
async def admin_redirect() -> RedirectResponse:
    return RedirectResponse("/admin/", status_code=308)


@admin_ui_router.get("/admin/")
async def admin_page() -> FileResponse:
    """The operators' web page; it signs in and calls /admin/* and /v1/* with a bearer token."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=UI_HEADERS)


def _too_large(limit: int) -> AppError:
    return AppError(413, "payload_too_large", f"request body over {limit} bytes", {"limit": limit})


def _body_reader(request: Request):
    async def read(limit: int, stream: bool = False):
        if stream:
            return _limited_stream(request, limit)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)
    return read


async def _limited_stream(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        yield chunk


# A proxied operation answers whatever its upstream answers (2xx with the upstream's body; errors
# in the shared error shape, which the chassis declares for every operation).
PROXIED_RESPONSES = {"2XX": {"description": "The upstream's answer, passed through"}}


def _upstream_path(request: Request) -> str:
    """The decoded path, percent-encoded again for the upstream; no dot segments.

    Routes and scopes are matched on the decoded path, so "/v1/features/%2e%2e/admin/..." must never
    become "/admin/..." on the upstream (the HTTP client would resolve the dots), and a control
    character in a path segment is the caller's 400, not an invalid upstream URL.
    """
    path = request.url.path
    if any(segment in (".", "..") for segment in path.split("/")):
        raise AppError(400, "bad_path", "the path must not contain '.' or '..' segments")
    return quote(path, safe="/:@!$&'()*+,;=-._~")


def _endpoint(route: Route):
    async def endpoint(request: Request, gateway: GatewayDep, ip: ClientIP) -> Response:
        result = await gateway.handle(route, request.method, _upstream_path(request), request.url.query,
                                      request.headers, _body_reader(request), ip)
        return Response(result.content, status_code=result.status, headers=result.headers)

    scope = "public" if route.scope is None else (route.scope or "any authenticated caller")
    endpoint.__doc__ = f"{route.summary}. Proxied to {route.upstream}; scope: {scope}."
    return endpoint


for _i, _route in enumerate(ROUTES):
    for _method in _route.methods:  # one operation per method: unique OpenAPI operation ids
        router.add_api_route(_route.path, _endpoint(_route), methods=[_method], summary=_route.summary,
                             name=f"{_route.upstream}_{_i}_{_method.lower()}", tags=[_route.upstream],
                             responses=PROXIED_RESPONSES,
                             include_in_schema=not _route.path.endswith("{rest:path}") and _method != "HEAD")
