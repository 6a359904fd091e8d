"""Request body size limit for every service: a small ASGI middleware, 413 in the error shape.

The limit is checked lazily, when the app reads the body: a declared Content-Length over the limit
fails the first read before a byte is taken, a chunked body fails once its running total passes the
limit. The failure is an HTTPException(413), so the chassis error handler answers it in the shared
shape (and a route that reads the body itself, like the model server's /v2 infer, may answer it in
its protocol's shape). Per-path limits (the pipeline's upload route) go through `set_body_limit`.
"""
from __future__ import annotations

import math

from fastapi import FastAPI, HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")
        self.limit = limit


class BodyLimitMiddleware:
    """Caps the request body at `max_bytes`; `overrides` maps a path prefix to its own limit."""

    def __init__(self, app: ASGIApp, max_bytes: int, overrides: dict[str, int] | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.overrides = overrides if overrides is not None else {}

    def limit_for(self, path: str) -> int:
        best = None
        for prefix, limit in self.overrides.items():
            if path.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, limit)
        return best[1] if best else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install_body_limit(app: FastAPI, max_bytes: int) -> None:
    app.state.body_limits = {}
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes, overrides=app.state.body_limits)


def set_body_limit(app: FastAPI, path_prefix: str, max_bytes: int) -> None:
    """A route (or routes under a prefix) with its own limit, e.g. an upload endpoint."""
    app.state.body_limits[path_prefix] = max_bytes


# -- JSON numbers ----------------------------------------------------------------------------------
# FastAPI parses bodies with the standard json module, which takes NaN, Infinity and 1e400 (= inf).
# Typed float fields refuse them with `allow_inf_nan=False`; free-form values (feature rows) call this.
def non_finite_path(value, path: str = "") -> str | None:
    """Where in a JSON-like value the first NaN or infinite number is, or None when there is none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "value")
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_path(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def reject_non_finite(value, path: str = ""):
    """For pydantic validators: ValueError naming the first NaN/Infinity, else the value itself."""
    found = non_finite_path(value, path)
    if found:
        raise ValueError(f"{found}: NaN and infinite numbers are not accepted")
    return value
