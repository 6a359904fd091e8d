from __future__ import annotations

import hmac
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.encoders import jsonable_encoder

from services.chassis.errors import AppError
from services.chassis.internal import check_internal_token

from .deps import AdminPrincipal, Audit, Auth, ClientIP, Principal, SubjectsDep
from .schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    AuditEventIn,
    IntrospectRequest,
    MeOut,
    RefreshRequest,
    RegisterRequest,
    RotateOut,
    SubjectLinkIn,
    TokenResponse,
    UserCreate,
    UserOut,
    UserUpdate,
)
from .service import ROLE_SCOPES

router = APIRouter(prefix="/v1/auth", tags=["auth"])
admin = APIRouter(prefix="/admin", tags=["admin"])
public = APIRouter(tags=["keys"])
internal = APIRouter(prefix="/internal", tags=["internal"])

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _tokens(pair, response: Response) -> TokenResponse:
    response.headers.update(NO_STORE)
    return TokenResponse(access_token=pair.access_token, token_type=pair.token_type, expires_in=pair.expires_in,
                         refresh_token=pair.refresh_token, scope=pair.scope)


@router.post("/token", response_model=TokenResponse, summary="OAuth2 token endpoint (password and refresh_token grants)")
async def token(auth: Auth, ip: ClientIP, response: Response,
                grant_type: Annotated[str, Form()] = "password",
                username: Annotated[str | None, Form(max_length=320)] = None,
                password: Annotated[str | None, Form(max_length=1024)] = None,
                refresh_token: Annotated[str | None, Form(max_length=512)] = None,
                scope: Annotated[str, Form()] = "") -> TokenResponse:
    """Form fields as in RFC 6749: `username` + `password`, or `grant_type=refresh_token` + `refresh_token`."""
    if grant_type == "password":
        if not username or not password:
            raise AppError(400, "invalid_request", "username and password are required")
        return _tokens(await auth.login(username, password, ip), response)
    if grant_type == "refresh_token":
        if not refresh_token:
            raise AppError(400, "invalid_request", "refresh_token is required")
        return _tokens(await auth.refresh(refresh_token), response)
    raise AppError(400, "unsupported_grant_type", f"grant_type {grant_type!r} is not supported")


@router.post("/refresh", response_model=TokenResponse, summary="Trade a refresh token for new tokens")
async def refresh(body: RefreshRequest, auth: Auth, response: Response) -> TokenResponse:
    """The presented refresh token is spent; presenting it again revokes the whole session."""
    return _tokens(await auth.refresh(body.refresh_token), response)


@router.post("/logout", status_code=204, summary="Revoke the session of a refresh token")
async def logout(body: RefreshRequest, auth: Auth) -> Response:
    await auth.logout(body.refresh_token)
    return Response(status_code=204)


@router.post("/logout-all", status_code=204, summary="Sign out everywhere: every session and access token")
async def logout_all(principal: Principal, auth: Auth, audit: Audit) -> Response:
    """Ends every session of the signed-in user; their access tokens stop working at every gateway."""
    if principal.kind != "user":
        raise AppError(403, "user_token_required", "signing out everywhere needs the user's own access token")
    n = await auth.sign_out_everywhere(principal.sub)
    await audit.record(principal.sub, "user.sign_out_everywhere", principal.sub, actor_role=principal.role,
                       details={"sessions": n})
    return Response(status_code=204)


@router.get("/me", response_model=MeOut)
async def me(principal: Principal, auth: Auth) -> MeOut:
    if principal.kind != "user":
        raise AppError(400, "not_a_user", "this credential is an API key, not a user",
                       {"sub": principal.sub, "scopes": sorted(principal.scopes)})
    user = await auth.get_user(principal.sub)
    return MeOut(id=user.id, email=user.email, role=user.role, disabled=user.disabled,
                 created_at=user.created_at, scopes=sorted(principal.scopes))


@router.post("/register", response_model=UserOut, status_code=201, summary="Self-registration (off by default)")
async def register(body: RegisterRequest, auth: Auth, request: Request) -> UserOut:
    settings = request.app.state.settings
    if not settings.allow_registration:
        raise AppError(403, "registration_disabled", "self-registration is turned off")
    return UserOut.model_validate(await auth.create_user(body.email, body.password, settings.default_role))


@public.get("/.well-known/jwks.json", summary="Public keys that verify access tokens (RFC 7517)")
async def jwks(auth: Auth, response: Response) -> dict:
    response.headers["Cache-Control"] = "public, max-age=60"
    return await auth.keys.jwks()


@internal.post("/introspect", summary="API key introspection for the gateway (X-Internal-Token)")
async def introspect(body: IntrospectRequest, auth: Auth, request: Request) -> dict:
    """Always needs the internal token (INTERNAL_TOKEN, or AUTH_INTROSPECTION_TOKEN): never open."""
    settings = request.app.state.settings
    presented = request.headers.get("x-internal-token", "")
    legacy = settings.introspection_token
    if not (legacy and presented and hmac.compare_digest(presented.encode(), legacy.encode())):
        check_internal_token(settings.internal_token, presented)
    return await auth.introspect_api_key(body.api_key)


@admin.get("/users", response_model=list[UserOut])
async def list_users(_: AdminPrincipal, auth: Auth, limit: int = Query(100, ge=1, le=1000),
                     offset: int = Query(0, ge=0, le=2**31 - 1)) -> list[UserOut]:
    return [UserOut.model_validate(u) for u in await auth.list_users(limit, offset)]


@admin.post("/users", response_model=UserOut, status_code=201)
async def create_user(body: UserCreate, admin_: AdminPrincipal, auth: Auth, audit: Audit) -> UserOut:
    user = await auth.create_user(body.email, body.password, body.role)
    await audit.record(admin_.sub, "user.create", str(user.id), actor_role=admin_.role, details={"role": user.role})
    return UserOut.model_validate(user)


@admin.patch("/users/{user_id}", response_model=UserOut, summary="Set a user's role or disable them")
async def update_user(user_id: str, body: UserUpdate, admin_: AdminPrincipal, auth: Auth, audit: Audit) -> UserOut:
    user = await auth.update_user(user_id, role=body.role, disabled=body.disabled)
    await audit.record(admin_.sub, "user.update", str(user.id), actor_role=admin_.role,
                       details=body.model_dump(exclude_none=True, include={"role", "disabled"}))
    return UserOut.model_validate(user)


@admin.post("/users/{user_id}/disable", response_model=UserOut)
async def disable_user(user_id: str, admin_: AdminPrincipal, auth: Auth, audit: Audit) -> UserOut:
    user = await auth.update_user(user_id, disabled=True)
    await audit.record(admin_.sub, "user.disable", str(user.id), actor_role=admin_.role)
    return UserOut.model_validate(user)


@admin.get("/api-keys", response_model=list[ApiKeyOut])
async def list_api_keys(_: AdminPrincipal, auth: Auth) -> list[ApiKeyOut]:
    return [ApiKeyOut.model_validate(k) for k in await auth.list_api_keys()]


@admin.post("/api-keys", response_model=ApiKeyCreated, status_code=201)
async def create_api_key(body: ApiKeyCreate, principal: AdminPrincipal, auth: Auth,
                         response: Response, audit: Audit) -> ApiKeyCreated:
    # A key minted by a key belongs to that key's owner: every key has a user behind it.
    owner = principal.sub if principal.kind == "user" else principal.claims.get("owner")
    if body.owner_id is not None:  # an admin issuing a key to a user: within that user's role
        user = await auth.get_user(body.owner_id)
        if user.disabled:
            raise AppError(422, "owner_disabled", "the owner's account is disabled")
        if not set(ROLE_SCOPES[body.role]) <= set(ROLE_SCOPES[user.role]):
            raise AppError(422, "role_beyond_owner", f"the owner's role {user.role} does not grant role {body.role}")
        owner = str(user.id)
    row, key = await auth.create_api_key(body.name, body.role, body.scopes, body.expires_in_s,
                                         body.rate_limit_rpm, owner)
    response.headers.update(NO_STORE)
    await audit.record(principal.sub, "api_key.create", str(row.id), actor_role=principal.role,
                       details={"role": row.role, "scopes": list(row.scopes), "prefix": row.prefix})
    return ApiKeyCreated(**ApiKeyOut.model_validate(row).model_dump(), key=key)


@admin.delete("/api-keys/{key_id}", response_model=ApiKeyOut, summary="Revoke an API key")
async def revoke_api_key(key_id: str, admin_: AdminPrincipal, auth: Auth, audit: Audit) -> ApiKeyOut:
    row = await auth.revoke_api_key(key_id)
    await audit.record(admin_.sub, "api_key.revoke", str(row.id), actor_role=admin_.role, details={"prefix": row.prefix})
    return ApiKeyOut.model_validate(row)


@admin.post("/signing-keys/rotate", response_model=RotateOut)
async def rotate(admin_: AdminPrincipal, auth: Auth, audit: Audit) -> RotateOut:
    kid = await auth.keys.rotate()
    await audit.record(admin_.sub, "signing_key.rotate", kid, actor_role=admin_.role)
    return RotateOut(kid=kid)


# -- privacy: the caller's own data, the audit log, data subjects (docs/privacy.md) -----------------
me_router = APIRouter(prefix="/v1/me", tags=["privacy"])


@me_router.get("/export", summary="Everything stored about the caller, across the services")
async def export_me(principal: Principal, auth: Auth, subjects: SubjectsDep, response: Response) -> dict:
    """A user gets their whole account; an API key gets only what was done under that key (two
    workloads holding two keys of one owner never read each other's data)."""
    response.headers.update(NO_STORE)
    if principal.kind != "user":
        return jsonable_encoder(await subjects.export_key(principal.claims.get("key_id", "")))
    return jsonable_encoder(await subjects.export((await auth.get_user(principal.sub)).id))


@me_router.delete("", summary="Erase the caller's account and data in every service (signed-in users only)")
async def erase_me(principal: Principal, subjects: SubjectsDep) -> dict:
    if principal.kind != "user":
        raise AppError(403, "user_token_required", "erasing an account needs the user's own access token, "
                       "not an API key")
    return await subjects.erase(uuid.UUID(principal.sub), actor=principal.sub, actor_role=principal.role,
                                by_self=True)


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise AppError(404, "user_not_found", "no such user") from None


@admin.get("/users/{user_id}/data", summary="Export a user's data (admin)")
async def export_user(user_id: str, admin_: AdminPrincipal, subjects: SubjectsDep, audit: Audit,
                      response: Response) -> dict:
    doc = jsonable_encoder(await subjects.export(_uuid(user_id)))
    await audit.record(admin_.sub, "subject.export", user_id, actor_role=admin_.role)
    response.headers.update(NO_STORE)
    return doc


@admin.delete("/users/{user_id}/data", summary="Erase a user's account and data in every service (admin)")
async def erase_user(user_id: str, admin_: AdminPrincipal, subjects: SubjectsDep) -> dict:
    """Idempotent: erasing again (or an id whose account is gone) removes what is left and answers 200."""
    return await subjects.erase(_uuid(user_id), actor=admin_.sub, actor_role=admin_.role, by_self=False)


@admin.get("/users/{user_id}/links", summary="Entity ids linked to a user (exported and erased with them)")
async def list_links(user_id: str, _: AdminPrincipal, auth: Auth, subjects: SubjectsDep) -> list[dict]:
    return await subjects.links((await auth.get_user(user_id)).id)


@admin.post("/users/{user_id}/links", status_code=201, summary="Link an entity id (e.g. a customer) to a user")
async def add_link(user_id: str, body: SubjectLinkIn, admin_: AdminPrincipal, auth: Auth, subjects: SubjectsDep,
                   audit: Audit) -> dict:
    uid = (await auth.get_user(user_id)).id
    await subjects.link(uid, body.entity, body.entity_id)
    await audit.record(admin_.sub, "user.link", str(uid), actor_role=admin_.role, details={"entity": body.entity})
    return {"entity": body.entity, "entity_id": body.entity_id}


@admin.delete("/users/{user_id}/links/{entity}/{entity_id}", summary="Unlink an entity id from a user")
async def remove_link(user_id: str, entity: str, entity_id: str, admin_: AdminPrincipal, auth: Auth,
                      subjects: SubjectsDep, audit: Audit) -> dict:
    uid = (await auth.get_user(user_id)).id
    n = await subjects.unlink(uid, entity, entity_id)
    await audit.record(admin_.sub, "user.unlink", str(uid), actor_role=admin_.role, details={"entity": entity})
    return {"deleted": n}


@admin.get("/audit", summary="Audit log of admin actions, newest first (admin)")
async def audit_log(_: AdminPrincipal, audit: Audit, action: str | None = Query(None, max_length=64),
                    actor: str | None = Query(None, max_length=200), target: str | None = Query(None, max_length=300),
                    service: str | None = Query(None, max_length=32), since: datetime | None = None,
                    until: datetime | None = None, before_id: int | None = Query(None, ge=1, le=2**63 - 1),
                    limit: int = Query(100, ge=1, le=1000)) -> dict:
    entries = await audit.list(action=action, actor=actor, target=target, service=service, since=since,
                               until=until, before_id=before_id, limit=limit)
    return {"entries": jsonable_encoder(entries),
            "next_before_id": entries[-1]["id"] if len(entries) == limit else None}


@internal.post("/audit", status_code=202, summary="Record another service's admin action (X-Internal-Token)")
async def post_audit(body: AuditEventIn, audit: Audit, request: Request) -> dict:
    check_internal_token(request.app.state.settings.internal_token, request.headers.get("x-internal-token"))
    await audit.record(body.actor, body.action, body.target, actor_role=body.actor_role, details=body.details,
                       service=body.service)
    return {"recorded": True}
