"""Auth over HTTP (in-process ASGI) with real Postgres and Redis: login, refresh rotation and reuse,
logout, brute-force lockout, bootstrap, admin endpoints, API keys, key rotation and JWKS."""
from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.auth.app import create_app
from services.auth.settings import AuthSettings
from services.chassis.clients import asyncpg_url
from tests.conftest import schema_database

ADMIN_EMAIL, ADMIN_PASSWORD = "root@example.test", "correct horse battery"
INTERNAL_TOKEN = secrets.token_urlsafe(24)
INTERNAL = {"X-Internal-Token": INTERNAL_TOKEN}


@pytest.fixture(scope="module")
def auth_db(postgres_server_url):
    """A database of its own with only auth's schema: these tests need a known 'no admin yet' state."""
    with schema_database(postgres_server_url, "auth") as url:
        yield url


def auth_settings(database_url: str, redis_url: str, **kw) -> AuthSettings:
    base = {"database_url": database_url, "redis_url": redis_url, "ready_max_cpu_percent": 100,
                "ready_max_memory_percent": 100, "bootstrap_admin_email": ADMIN_EMAIL,
                "bootstrap_admin_password": ADMIN_PASSWORD, "login_max_failures_per_account": 3,
                "login_max_failures_per_ip": 50, "key_cache_s": 0.0, "internal_token": INTERNAL_TOKEN,
                "erase_settle_s": 0.0}
    base.update(kw)
    return AuthSettings(**base)


@pytest.fixture
async def client(auth_db, redis_url):
    app = create_app(auth_settings(auth_db, redis_url))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://auth") as c:
            c.app = app
            yield c


async def login(c, email=ADMIN_EMAIL, password=ADMIN_PASSWORD, **headers) -> httpx.Response:
    return await c.post("/v1/auth/token", data={"username": email, "password": password}, headers=headers)


def bearer(tokens: dict) -> dict:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def new_user(c, admin_headers, role="developer", password="lantern-orbit-7731") -> tuple[str, str]:
    email = f"u{secrets.token_hex(4)}@example.test"
    r = await c.post("/admin/users", json={"email": email, "password": password, "role": role}, headers=admin_headers)
    assert r.status_code == 201, r.text
    return email, password


async def test_bootstrap_admin_logs_in_and_sees_itself(client):
    r = await login(client)
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert tokens["token_type"] == "bearer" and tokens["refresh_token"].startswith("rt_")
    assert set(tokens["scope"].split()) == {"predict", "features:read", "features:write", "jobs", "admin"}
    assert r.headers["cache-control"] == "no-store"
    me = await client.get("/v1/auth/me", headers=bearer(tokens))
    assert me.status_code == 200, me.text
    assert me.json()["email"] == ADMIN_EMAIL and me.json()["role"] == "admin"


async def test_bootstrap_is_ignored_once_an_admin_exists(auth_db, redis_url, client):
    app = create_app(auth_settings(auth_db, redis_url, bootstrap_admin_email="second@example.test",
                                   bootstrap_admin_password="another password"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://auth") as c:
            assert (await login(c, "second@example.test", "another password")).status_code == 401
            assert await app.state.auth.admin_exists()


async def test_access_token_claims_and_header(client):
    from jose import jwt

    tokens = (await login(client)).json()
    header = jwt.get_unverified_header(tokens["access_token"])
    assert header["alg"] == "RS256" and header["kid"]
    claims = jwt.get_unverified_claims(tokens["access_token"])
    assert {"iss", "aud", "sub", "exp", "iat", "nbf", "jti", "scope"} <= set(claims)
    assert claims["iss"] == "aistack-auth" and claims["aud"] == "aistack"
    jwks = (await client.get("/.well-known/jwks.json")).json()
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    assert all("d" not in k and "p" not in k for k in jwks["keys"])  # public parts only


async def test_refresh_rotates_and_reuse_revokes_the_family(client):
    first = (await login(client)).json()
    r = await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"]
    # The spent token again: 401, and the whole family (including `second`) is revoked.
    reuse = await client.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reuse.status_code == 401 and reuse.json()["error"]["code"] == "refresh_token_reused"
    assert "WWW-Authenticate" in reuse.headers
    after = await client.post("/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert after.status_code == 401
    # Another session of the same user is untouched.
    other = (await login(client)).json()
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": other["refresh_token"]})).status_code == 200


async def test_refresh_grant_on_the_token_endpoint(client):
    first = (await login(client)).json()
    r = await client.post("/v1/auth/token", data={"grant_type": "refresh_token",
                                                  "refresh_token": first["refresh_token"]})
    assert r.status_code == 200, r.text


async def test_logout_revokes_the_session(client):
    tokens = (await login(client)).json()
    r = await client.post("/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 204
    r = await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 401


async def test_wrong_password_is_401_and_repeated_failures_lock_the_account(client):
    admin = bearer((await login(client)).json())
    email, password = await new_user(client, admin)
    for _ in range(3):
        r = await login(client, email, "wrong password")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_credentials"
    # Locked: even the right password is refused, with Retry-After.
    r = await login(client, email, password)
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "login_locked"
    # Other accounts still log in.
    assert (await login(client)).status_code == 200


async def test_per_address_limit_locks_out_a_client_address(auth_db, redis_url):
    app = create_app(auth_settings(auth_db, redis_url, login_max_failures_per_ip=4,
                                   login_max_failures_per_account=100, trusted_proxies="127.0.0.1/32"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app, client=("127.0.0.1", 5000)),
                                     base_url="http://auth") as c:
            attacker = {"X-Forwarded-For": f"203.0.113.{secrets.randbelow(250)}"}
            for i in range(4):  # a different account each time: only the per-address limit applies
                assert (await login(c, f"nobody{i}{secrets.token_hex(2)}@x.test", "x", **attacker)).status_code == 401
            assert (await login(c, **attacker)).status_code == 429
            assert (await login(c, **{"X-Forwarded-For": "198.51.100.7"})).status_code == 200


async def test_unknown_user_is_401_like_a_wrong_password(client):
    r = await login(client, "ghost@example.test", "whatever-pass")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_credentials"


async def test_admin_endpoints_need_admin_scope(client):
    admin = bearer((await login(client)).json())
    email, password = await new_user(client, admin, role="developer")
    dev = bearer((await login(client, email, password)).json())
    for method, path in (("GET", "/admin/users"), ("POST", "/admin/api-keys"), ("POST", "/admin/signing-keys/rotate")):
        r = await client.request(method, path, headers=dev, json={"name": "x"})
        assert r.status_code == 403, (path, r.text)
    assert (await client.get("/admin/users")).status_code == 401


async def test_admin_lists_sets_role_and_disables_users(client):
    admin = bearer((await login(client)).json())
    email, password = await new_user(client, admin, role="viewer")
    users = (await client.get("/admin/users", headers=admin)).json()
    user = next(u for u in users if u["email"] == email)
    r = await client.patch(f"/admin/users/{user['id']}", json={"role": "developer"}, headers=admin)
    assert r.status_code == 200 and r.json()["role"] == "developer"
    tokens = (await login(client, email, password)).json()
    assert "jobs" in tokens["scope"].split()
    r = await client.post(f"/admin/users/{user['id']}/disable", headers=admin)
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert (await login(client, email, password)).status_code == 401
    assert (await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 401
    bad = await client.patch(f"/admin/users/{user['id']}", json={"role": "emperor"}, headers=admin)
    assert bad.status_code == 422


async def test_self_registration_is_off_by_default(client):
    r = await client.post("/v1/auth/register", json={"email": "me@example.test", "password": "lantern-orbit-7731"})
    assert r.status_code == 403


async def test_api_key_shown_once_introspected_and_revoked(client):
    admin = bearer((await login(client)).json())
    r = await client.post("/admin/api-keys", json={"name": "svc", "role": "service", "scopes": ["predict"]},
                          headers=admin)
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("ak_" + created["prefix"] + "_")
    listed = (await client.get("/admin/api-keys", headers=admin)).json()
    assert all("key" not in k for k in listed) and any(k["id"] == created["id"] for k in listed)
    info = (await client.post("/internal/introspect", json={"api_key": key}, headers=INTERNAL)).json()
    assert info["active"] and info["scope"] == "predict" and info["role"] == "service"
    listed = (await client.get("/admin/api-keys", headers=admin)).json()
    assert next(k for k in listed if k["id"] == created["id"])["last_used_at"]
    assert not (await client.post("/internal/introspect", json={"api_key": key + "x"}, headers=INTERNAL)).json()["active"]
    assert (await client.delete(f"/admin/api-keys/{created['id']}", headers=admin)).status_code == 200
    assert not (await client.post("/internal/introspect", json={"api_key": key}, headers=INTERNAL)).json()["active"]


async def test_api_key_scopes_cannot_exceed_its_role(client):
    admin = bearer((await login(client)).json())
    r = await client.post("/admin/api-keys", json={"name": "x", "role": "viewer", "scopes": ["admin"]}, headers=admin)
    assert r.status_code == 422


async def test_expired_api_key_is_inactive(client):
    admin = bearer((await login(client)).json())
    key = (await client.post("/admin/api-keys", json={"name": "short", "expires_in_s": 1}, headers=admin)).json()["key"]
    deadline = time.monotonic() + 30
    while (await client.post("/internal/introspect", json={"api_key": key}, headers=INTERNAL)).json()["active"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_rotation_keeps_the_previous_key_published(client):
    admin = bearer((await login(client)).json())
    old_token = (await login(client)).json()["access_token"]
    before = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    r = await client.post("/admin/signing-keys/rotate", headers=admin)
    assert r.status_code == 200
    new_kid = r.json()["kid"]
    after = {k["kid"] for k in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    assert new_kid in after and before <= after
    # Tokens signed by the old key still verify; new tokens carry the new kid.
    assert (await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {old_token}"})).status_code == 200
    from jose import jwt

    fresh = (await login(client)).json()["access_token"]
    assert jwt.get_unverified_header(fresh)["kid"] == new_kid


async def test_private_keys_are_encrypted_at_rest(auth_db, client):
    engine = create_async_engine(asyncpg_url(auth_db))
    async with engine.connect() as conn:
        blobs = [bytes(r[0]) for r in await conn.execute(text("SELECT private_enc FROM auth.signing_keys"))]
    await engine.dispose()
    assert blobs and all(b"PRIVATE KEY" not in b for b in blobs)
