"""One JSON error shape for every service: {"error": {"code", "message", "details"}}.

Clients never see a stack trace; 4xx is the caller's fault, 503 + Retry-After is overload.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("aistack.errors")

_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "validation_error", 429: "rate_limited", 500: "internal", 502: "bad_gateway",
    503: "unavailable", 504: "upstream_timeout",
}


class AppError(Exception):
    """Raise from domain code; the handler turns it into the shared error shape."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}

    def __reduce__(self):
        # Picklable whatever a subclass's __init__ takes (Celery stores a task's exception).
        return self.__class__.__new__, (self.__class__, self.message), self.__dict__


def error_body(code: str, message: str, details: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


class ErrorJSONResponse(JSONResponse):
    """ASCII JSON: an error message may quote the caller's input, lone surrogates included, and
    must still render (as \\ud800 escapes) instead of failing with a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _validation_details(exc: RequestValidationError) -> tuple[int, str, str, list]:
    errors = exc.errors()
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
               for e in errors]
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed_json", "request body is not valid JSON", details
    fields = ", ".join(".".join(str(p) for p in d["loc"][1:] or d["loc"]) for d in details)
    return 422, "validation_error", f"invalid request: {fields}", details


ERROR_SCHEMA = {
    "title": "Error", "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "details": {}}}},
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}


def document_errors(schema: dict) -> dict:
    """The OpenAPI document tells the truth about errors: every operation may answer 4XX in the
    shared shape (401, 403, 404, 413, 429, ...), FastAPI's 422 schema is replaced by that shape,
    and declared error responses without a schema get it. An operation that declares its own
    "4XX" (the model server's /v2 protocol errors) keeps it."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    components["HTTPValidationError"] = ERROR_SCHEMA
    for item in schema.get("paths", {}).values():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses = op["responses"]
            for code, response in responses.items():
                content = response.get("content", {}).get("application/json")
                if code[:1] in "45" and content is not None and "schema" not in content:
                    content["schema"] = _ERROR_REF
            responses.setdefault("4XX", {"description": "Error (the shared error shape)",
                                         "content": {"application/json": {"schema": _ERROR_REF}}})
    return schema


def install_error_handlers(app: FastAPI) -> None:
    build_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(build_openapi())
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError):
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        status, code, message, details = _validation_details(exc)
        return error_response(status, code, message, details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        details = None if isinstance(exc.detail, str) else exc.detail
        return error_response(exc.status_code, code, message, details, getattr(exc, "headers", None))

    async def _unavailable(request: Request, exc: Exception):
        # A datastore that is down or restarting is not a bug of ours: 503 + Retry-After, no trace.
        log.warning("dependency unavailable on %s %s: %s: %s", request.method, request.url.path,
                    type(exc).__name__, exc)
        return error_response(503, "dependency_unavailable", "a service this request needs is unavailable; "
                              "retry later", None, {"Retry-After": "2"})

    for exc_type in dependency_unavailable_errors():
        app.add_exception_handler(exc_type, _unavailable)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal server error")

    build_stack = app.build_middleware_stack

    def contained_stack():
        return ContainErrors(build_stack())

    app.build_middleware_stack = contained_stack


_INTERNAL = error_response(500, "internal", "internal server error").body


class ContainErrors:
    """The outermost ASGI layer: no exception escapes to the server once a response is complete.

    Starlette's ServerErrorMiddleware sends the 500 above and then re-raises "so servers can log
    it"; uvicorn answers that by closing the connection, and a client's pooled keep-alive
    connection then fails on reuse (a 502 at the gateway for a request that was never sent). Here
    the 500 is sent if nothing was, the error is swallowed once it was logged and answered, and
    only a response cut off midway (which must not look complete) still closes the connection.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "complete": False}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if state["complete"]:
                return  # answered (and logged) by the handler above
            if state["started"]:
                raise
            log.exception("unhandled error outside the handlers on %s %s", scope.get("method"), scope.get("path"))
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(_INTERNAL)).encode())]})
            await send({"type": "http.response.body", "body": _INTERNAL})


def dependency_unavailable_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean Postgres or Redis cannot be reached now (down, restarting, timed out)."""
    import asyncpg
    import redis.exceptions as redis_errors
    from sqlalchemy import exc as sa

    return (ConnectionError, TimeoutError, sa.OperationalError, sa.InterfaceError, sa.TimeoutError,
            sa.DisconnectionError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError,
            redis_errors.ConnectionError, redis_errors.TimeoutError)
