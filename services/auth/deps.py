from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.chassis.clientip import client_address

from .privacy import AuditLog, Subjects
from .service import API_KEY_PREFIX, AuthService, unauthorized
from .service import Principal as Caller


def _service(request: Request) -> AuthService:
    return request.app.state.auth


Auth = Annotated[AuthService, Depends(_service)]


def _credentials(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("x-api-key") or None


async def _principal(request: Request, auth: Auth) -> Caller:
    """Auth checks credentials itself (it trusts no X-Principal header): a JWT or an API key."""
    token = _credentials(request)
    if not token:
        raise unauthorized("missing credentials", error="invalid_request")
    if token.startswith(API_KEY_PREFIX):
        return await auth.principal_from_api_key(token)  # introspection applies the owner's state
    return await auth.current(await auth.verify_access(token))


Principal = Annotated[Caller, Depends(_principal)]


async def _admin(principal: Principal) -> Caller:
    principal.require("admin")
    return principal


AdminPrincipal = Annotated[Caller, Depends(_admin)]


def _client_ip(request: Request) -> str | None:
    peer = request.client.host if request.client else None
    return client_address(peer, request.headers.get("x-forwarded-for"), request.app.state.trusted_proxies)


ClientIP = Annotated[str | None, Depends(_client_ip)]


def _audit(request: Request):
    return request.app.state.audit


def _subjects(request: Request):
    return request.app.state.subjects


Audit = Annotated[AuditLog, Depends(_audit)]
SubjectsDep = Annotated[Subjects, Depends(_subjects)]
