# ruff: noqa: F811, SIM117 - fixtures imported from test_auth_service are used as parameters
"""Issue 13 at the auth service (in-process ASGI, real Postgres and Redis): rights follow the account's
current state, keys never exceed their owner, revocation is published, the login limiter is atomic,
the internal endpoint is never open, passwords follow NIST SP 800-63B rev. 4."""
from __future__ import annotations

import asyncio
import json
import secrets

import httpx
import pytest
import redis.asyncio as aioredis

from services.auth.app import create_app
from tests.integration.test_auth_service import (  # noqa: F401 - fixtures
    INTERNAL,
    auth_db,
    auth_settings,
    bearer,
    client,
    login,
    new_user,
)

STRONG = "lantern-orbit-7731"


async def user_with_role(c, admin, role: str) -> tuple[str, dict, dict]:
    """(user id, its tokens, admin headers)"""
    email, password = await new_user(c, admin, role=role, password=STRONG)
    tokens = (await login(c, email, password)).json()
    me = (await c.get("/v1/auth/me", headers=bearer(tokens))).json()
    return me["id"], tokens, admin


async def test_defect1_a_demoted_admin_loses_admin_rights_at_once(client):
    """Old token of a user demoted admin -> viewer: no new admin key, no self-promotion."""
    admin = bearer((await login(client)).json())
    uid, tokens, _ = await user_with_role(client, admin, "admin")
    old = bearer(tokens)
    assert (await client.get("/admin/users", headers=old)).status_code == 200
    r = await client.patch(f"/admin/users/{uid}", json={"role": "viewer"}, headers=admin)
    assert r.status_code == 200, r.text
    made = await client.post("/admin/api-keys", json={"name": "comeback", "role": "admin"}, headers=old)
    assert made.status_code == 401, made.text
    back = await client.patch(f"/admin/users/{uid}", json={"role": "admin"}, headers=old)
    assert back.status_code == 401, back.text


async def _email(c, admin, uid):
    users = (await c.get("/admin/users", headers=admin)).json()
    return [next(u["email"] for u in users if u["id"] == uid), STRONG]


async def test_tokens_issued_after_a_role_change_carry_the_new_role_only(client):
    admin = bearer((await login(client)).json())
    uid, _, _ = await user_with_role(client, admin, "developer")
    assert (await client.patch(f"/admin/users/{uid}", json={"role": "viewer"}, headers=admin)).status_code == 200
    fresh = (await login(client, *(await _email(client, admin, uid)))).json()
    me = await client.get("/v1/auth/me", headers=bearer(fresh))
    assert me.status_code == 200 and me.json()["role"] == "viewer" and me.json()["scopes"] == ["features:read"]


async def test_defect2_a_disabled_owners_keys_stop_and_keys_minted_by_keys_have_an_owner(client):
    admin = bearer((await login(client)).json())
    uid, tokens, _ = await user_with_role(client, admin, "admin")
    owner = bearer(tokens)
    k1 = (await client.post("/admin/api-keys", json={"name": "k1", "role": "admin"}, headers=owner)).json()
    assert k1["owner_id"] == uid
    # A key minted by a key belongs to that key's owner.
    k2 = await client.post("/admin/api-keys", json={"name": "k2", "role": "admin"}, headers={"X-API-Key": k1["key"]})
    assert k2.status_code == 201, k2.text
    assert k2.json()["owner_id"] == uid
    info = (await client.post("/internal/introspect", json={"api_key": k2.json()["key"]}, headers=INTERNAL)).json()
    assert info["active"] and info["owner"] == uid
    # Disable the owner: both keys die at once, at auth, and can mint nothing.
    assert (await client.post(f"/admin/users/{uid}/disable", headers=admin)).status_code == 200
    for k in (k1["key"], k2.json()["key"]):
        assert not (await client.post("/internal/introspect", json={"api_key": k}, headers=INTERNAL)).json()["active"]
        r = await client.post("/admin/api-keys", json={"name": "k3", "role": "admin"}, headers={"X-API-Key": k})
        assert r.status_code == 401, r.text


async def test_a_demoted_owners_key_is_demoted_too(client):
    admin = bearer((await login(client)).json())
    uid, tokens, _ = await user_with_role(client, admin, "admin")
    key = (await client.post("/admin/api-keys", json={"name": "k", "role": "admin"}, headers=bearer(tokens))).json()
    assert (await client.patch(f"/admin/users/{uid}", json={"role": "viewer"}, headers=admin)).status_code == 200
    info = (await client.post("/internal/introspect", json={"api_key": key["key"]}, headers=INTERNAL)).json()
    assert info["active"] and info["role"] == "viewer" and info["scope"] == "features:read"
    r = await client.post("/admin/api-keys", json={"name": "k3", "role": "admin"}, headers={"X-API-Key": key["key"]})
    assert r.status_code == 403


async def test_defect4_an_api_keys_export_covers_that_key_only(client, monkeypatch):
    admin_tokens = (await login(client)).json()
    admin = bearer(admin_tokens)
    key = (await client.post("/admin/api-keys", json={"name": "workload-a"}, headers=admin)).json()
    other = (await client.post("/admin/api-keys", json={"name": "workload-b"}, headers=admin)).json()
    subjects = client.app.state.subjects
    asked = []

    async def fake_call(service, method, path, **kw):  # the other services are not running here
        asked.append((service, path))
        return {}

    monkeypatch.setattr(subjects, "_call", fake_call)
    r = await client.get("/v1/me/export", headers={"X-API-Key": key["key"]})
    assert r.status_code == 200, r.text
    doc = r.json()
    text = json.dumps(doc)
    assert doc["principals"] == [f"apikey:{key['id']}"] and doc["api_key"]["id"] == key["id"]
    assert "account" not in doc and "sessions" not in doc and other["id"] not in text
    assert "root@example.test" not in text
    assert {p for _, p in asked} == {f"/internal/subjects/apikey%3A{key['id']}"}


async def test_defect5_concurrent_guesses_verify_at_most_the_limit(client):
    """20 wrong passwords and the right one at once: at most 3 (the limit here) reach the verify."""
    admin = bearer((await login(client)).json())
    email, password = await new_user(client, admin, password=STRONG)
    auth = client.app.state.auth
    verified = 0
    import services.auth.service as svc

    real = svc.verify_password

    def counting(h, p):
        nonlocal verified
        verified += 1
        return real(h, p)

    svc.verify_password = counting
    try:
        guesses = [login(client, email, f"wrong-{i}-{secrets.token_hex(8)}") for i in range(20)]
        results = await asyncio.gather(*guesses, login(client, email, password))
    finally:
        svc.verify_password = real
    codes = [r.status_code for r in results]
    limit = auth.s.login_max_failures_per_account
    assert verified <= limit, (verified, codes)
    assert codes.count(429) >= 21 - limit and all(c in (200, 401, 429) for c in codes)


async def test_introspection_is_never_open(auth_db, redis_url):
    """Issue 13: without the internal token (configured or not) introspection answers 403."""
    app = create_app(auth_settings(auth_db, redis_url, internal_token=None))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://auth") as c:
            r = await c.post("/internal/introspect", json={"api_key": "ak_x_y"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "internal_disabled"


async def test_introspection_refuses_a_wrong_token(client):
    r = await client.post("/internal/introspect", json={"api_key": "ak_x_y"}, headers={"X-Internal-Token": "nope"})
    assert r.status_code == 403


async def test_refuses_to_start_without_internal_token_off_loopback(auth_db, redis_url, monkeypatch):
    monkeypatch.delenv("AISTACK_ENV", raising=False)
    app = create_app(auth_settings(auth_db, redis_url, internal_token=None, host="0.0.0.0"))
    with pytest.raises(RuntimeError, match="INTERNAL_TOKEN"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.parametrize("password", ["12345678", "password-123", "123456789012345", "passwordpassword1"])
async def test_weak_passwords_are_refused_with_the_reason(client, password):
    admin = bearer((await login(client)).json())
    r = await client.post("/admin/users", json={"email": f"w{secrets.token_hex(3)}@example.test",
                                                "password": password}, headers=admin)
    assert r.status_code == 422 and r.json()["error"]["code"] == "weak_password", r.text


async def test_a_weak_bootstrap_admin_password_stops_the_start(auth_db, redis_url):
    app = create_app(auth_settings(auth_db, redis_url, bootstrap_admin_email="weak@example.test",
                                   bootstrap_admin_password="12345678"))
    with pytest.raises(RuntimeError, match="AUTH_BOOTSTRAP_ADMIN_PASSWORD"):
        async with app.router.lifespan_context(app):
            pass


async def test_logout_and_sign_out_everywhere_revoke_access_tokens_and_publish_it(client, redis_url):
    admin = bearer((await login(client)).json())
    uid, tokens, _ = await user_with_role(client, admin, "developer")
    second = (await login(client, *(await _email(client, admin, uid)))).json()
    r = aioredis.Redis.from_url(redis_url)
    try:
        # logout: that session's access token dies; the other session lives on
        assert (await client.post("/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})).status_code == 204
        assert (await client.get("/v1/auth/me", headers=bearer(tokens))).status_code == 401
        assert (await client.get("/v1/auth/me", headers=bearer(second))).status_code == 200
        published = await r.hgetall("auth:revocations")
        assert any(k.startswith(b"sid:") for k in published)
        # sign out everywhere: every access token and refresh token of the user
        assert (await client.post("/v1/auth/logout-all", headers=bearer(second))).status_code == 204
        assert (await client.get("/v1/auth/me", headers=bearer(second))).status_code == 401
        assert (await client.post("/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})).status_code == 401
        assert f"user:{uid}".encode() in await r.hgetall("auth:revocations")
        # a new login works again
        fresh = (await login(client, *(await _email(client, admin, uid)))).json()
        assert (await client.get("/v1/auth/me", headers=bearer(fresh))).status_code == 200
    finally:
        await r.aclose()


@pytest.mark.parametrize("header", [{"alg": ["RS256"], "kid": "k"}, {"alg": {"x": 1}, "kid": "k"},
                                    {"alg": "RS256\u00e9\u4e2d", "kid": "k"}, {"alg": 'RS"256', "kid": "k"},
                                    {"alg": "RS256", "kid": ["k"]}, ["not", "an", "object"]])
async def test_defect6_malformed_jwt_headers_are_401_at_auth(client, header):
    import base64

    def b64(doc) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    token = f"{b64(header)}.{b64({'sub': 'x'})}.c2ln"
    r = await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401 and r.json()["error"]["code"], r.text
