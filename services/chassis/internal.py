"""Service-to-service plumbing: the shared internal token and the audit event stream.

Internal endpoints (`/internal/*`) are never routed by the gateway; each service that serves them
also demands the header `X-Internal-Token` equal to INTERNAL_TOKEN (one unprefixed setting shared
by the stack, like DATABASE_URL). Unset, internal endpoints answer 403: they stay closed until an
operator configures the token (`aistack up` and the test stack generate one), and auth and the
gateway refuse to start unless they listen on loopback only (`require_internal_token`).

Audit events: a service that performs an admin action appends it to the Redis stream
`auth:audit:events`, which auth owns and documents (docs/privacy.md): auth consumes it into the
`auth.audit_log` table. Appending never fails the admin action (a warning is logged instead).
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from .errors import AppError

log = logging.getLogger("aistack.audit")

INTERNAL_HEADER = "X-Internal-Token"
AUDIT_STREAM = "auth:audit:events"
AUDIT_MAXLEN = 100_000


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def require_internal_token(settings, *alternatives: str | None) -> None:
    """Refuse to start without INTERNAL_TOKEN (or one of `alternatives`, a service's older separate
    secret), except in development: a service bound to a loopback address only, or
    AISTACK_ENV=development. Without the token the internal endpoints would stay closed (403) and
    the stack half-broken; better to say so at start."""
    if getattr(settings, "internal_token", None) or any(alternatives):
        return
    if os.environ.get("AISTACK_ENV", "").lower() in ("development", "dev", "test"):
        return
    if getattr(settings, "host", "") in LOOPBACK_HOSTS:
        log.warning("INTERNAL_TOKEN is not set: internal endpoints answer 403 (development only)")
        return
    raise RuntimeError(f"{settings.service_name}: INTERNAL_TOKEN is not set; refusing to start on "
                       f"{settings.host} (set it to a random secret shared by the stack, as `aistack up` does)")


def check_internal_token(expected: str | None, presented: str | None) -> None:
    if not expected:
        raise AppError(403, "internal_disabled", "internal API disabled: INTERNAL_TOKEN is not configured")
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise AppError(403, "forbidden", "this internal endpoint needs the internal token")


def _require_internal(request: Request) -> None:
    check_internal_token(getattr(request.app.state.settings, "internal_token", None),
                         request.headers.get(INTERNAL_HEADER))


# Add to an internal router: APIRouter(prefix="/internal", dependencies=[Depends(require_internal)]).
require_internal = _require_internal
InternalCaller = Annotated[None, Depends(_require_internal)]


def internal_headers(token: str | None) -> dict[str, str]:
    return {INTERNAL_HEADER: token} if token else {}


def audit_entry(actor: str, action: str, target: str = "", *, service: str, actor_role: str = "",
                details: dict[str, Any] | None = None) -> dict[str, bytes | str]:
    """The stream entry for one admin action. `details` must carry no secrets or personal data."""
    return {"time": f"{time.time():.6f}", "service": service, "actor": actor or "unknown",
            "actor_role": actor_role or "", "action": action, "target": target or "",
            "details": orjson.dumps(details or {}, default=str)}


async def publish_audit(redis, actor: str, action: str, target: str = "", *, service: str,
                        actor_role: str = "", details: dict[str, Any] | None = None) -> bool:
    """Append an admin action to auth's audit stream; False (and a warning) if Redis is unavailable."""
    try:
        await redis.xadd(AUDIT_STREAM, audit_entry(actor, action, target, service=service, actor_role=actor_role,
                                                   details=details), maxlen=AUDIT_MAXLEN, approximate=True)
        return True
    except Exception as exc:  # noqa: BLE001 - the admin action already happened; never fail it
        log.warning("audit event not recorded", extra={"action": action, "error": str(exc)})
        return False
