from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response

from services.chassis.errors import AppError

from .deps import AdminPrincipal, Auth, ClientIP, Principal
from .schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    IntrospectRequest,
    MeOut,
    RefreshRequest,
    RegisterRequest,
    RotateOut,
    TokenResponse,
    UserCreate,
    UserOut,
    UserUpdate,
)

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


@internal.post("/introspect", summary="API key introspection for the gateway")
async def introspect(body: IntrospectRequest, auth: Auth, request: Request) -> dict:
    expected = request.app.state.settings.introspection_token
    if expected and not hmac.compare_digest(request.headers.get("x-internal-token", ""), expected):
        raise AppError(403, "forbidden", "introspection needs the internal token")
    return await auth.introspect_api_key(body.api_key)


@admin.get("/users", response_model=list[UserOut])
async def list_users(_: AdminPrincipal, auth: Auth, limit: int = Query(100, ge=1, le=1000),
                     offset: int = Query(0, ge=0)) -> list[UserOut]:
    return [UserOut.model_validate(u) for u in await auth.list_users(limit, offset)]


@admin.post("/users", response_model=UserOut, status_code=201)
async def create_user(body: UserCreate, _: AdminPrincipal, auth: Auth) -> UserOut:
    return UserOut.model_validate(await auth.create_user(body.email, body.password, body.role))


@admin.patch("/users/{user_id}", response_model=UserOut, summary="Set a user's role or disable them")
async def update_user(user_id: str, body: UserUpdate, _: AdminPrincipal, auth: Auth) -> UserOut:
    return UserOut.model_validate(await auth.update_user(user_id, role=body.role, disabled=body.disabled))


@admin.post("/users/{user_id}/disable", response_model=UserOut)
async def disable_user(user_id: str, _: AdminPrincipal, auth: Auth) -> UserOut:
    return UserOut.model_validate(await auth.update_user(user_id, disabled=True))


@admin.get("/api-keys", response_model=list[ApiKeyOut])
async def list_api_keys(_: AdminPrincipal, auth: Auth) -> list[ApiKeyOut]:
    return [ApiKeyOut.model_validate(k) for k in await auth.list_api_keys()]


@admin.post("/api-keys", response_model=ApiKeyCreated, status_code=201)
async def create_api_key(body: ApiKeyCreate, principal: AdminPrincipal, auth: Auth,
                         response: Response) -> ApiKeyCreated:
    owner = principal.sub if principal.kind == "user" else None
    row, key = await auth.create_api_key(body.name, body.role, body.scopes, body.expires_in_s,
                                         body.rate_limit_rpm, owner)
    response.headers.update(NO_STORE)
    return ApiKeyCreated(**ApiKeyOut.model_validate(row).model_dump(), key=key)


@admin.delete("/api-keys/{key_id}", response_model=ApiKeyOut, summary="Revoke an API key")
async def revoke_api_key(key_id: str, _: AdminPrincipal, auth: Auth) -> ApiKeyOut:
    return ApiKeyOut.model_validate(await auth.revoke_api_key(key_id))


@admin.post("/signing-keys/rotate", response_model=RotateOut)
async def rotate(_: AdminPrincipal, auth: Auth) -> RotateOut:
    return RotateOut(kid=await auth.keys.rotate())
