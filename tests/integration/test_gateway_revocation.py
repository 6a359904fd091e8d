# ruff: noqa: F811 - fixtures imported from test_gateway_http are used as parameters
"""Issue 13 at the gateway (real auth server, echo upstreams, real Redis): revocation reaches every
replica from memory, keys follow their owner, failed authentication is limited per address before
any lookup, malformed headers are 401, operator endpoints and internal addresses are not public."""
from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time

import httpx
import pytest
from prometheus_client import REGISTRY

from services.gateway.app import create_app as gateway_app
from tests.integration.test_gateway_http import (  # noqa: F401
    INTERNAL_TOKEN,
    auth_db,
    auth_server,
    bearer,
    close,
    create_key,
    gw,
    gw_settings,
    login,
    upstreams,
)

STRONG = "lantern-orbit-7731"


async def client_at(settings, address: str):
    """A gateway (its own lifespan, like a replica) seen from one client address."""
    app = gateway_app(settings)
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app, client=(address, 1234)), base_url="http://gw",
                          timeout=30)
    c.app, c._ctx = app, ctx
    return c


def random_ip() -> str:
    return f"198.51.100.{secrets.randbelow(250) + 1}" if secrets.randbelow(2) else \
        f"203.0.113.{secrets.randbelow(250) + 1}"


async def make_user(gw, admin, role="developer") -> tuple[str, str]:
    email = f"r{secrets.token_hex(4)}@example.test"
    r = await gw.post("/admin/users", json={"email": email, "password": STRONG, "role": role}, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["id"], email


async def until(predicate, what: str, timeout: float = 30.0) -> float:
    """Poll until predicate() is true; returns the seconds it took (reported, never asserted)."""
    start = time.monotonic()
    while not await predicate():
        assert time.monotonic() - start < timeout, f"{what} never happened"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
async def replicas(redis_url, auth_server, upstreams):
    """Two gateway replicas with a long API-key cache: only revocation events can explain a refusal."""
    settings = gw_settings(redis_url, auth_server, upstreams, api_key_cache_ttl_s=300.0)
    one, two = await client_at(settings, random_ip()), await client_at(settings, random_ip())
    yield one, two
    await close(one)
    await close(two)


async def refused_everywhere(replicas, headers, path="/v1/predict/fraud") -> bool:
    codes = [(await g.post(path, json={}, headers=headers)).status_code for g in replicas]
    return all(c == 401 for c in codes)


@pytest.mark.parametrize("change", ["disable", "demote", "logout", "logout_all"])
async def test_access_tokens_die_at_every_replica(replicas, change):
    one, two = replicas
    admin = bearer((await login(one))["access_token"])
    uid, email = await make_user(one, admin)
    tokens = await login(one, email, STRONG)
    user = bearer(tokens["access_token"])
    for g in replicas:
        assert (await g.post("/v1/predict/fraud", json={}, headers=user)).status_code == 200
    if change == "disable":
        assert (await one.post(f"/admin/users/{uid}/disable", headers=admin)).status_code == 200
    elif change == "demote":
        assert (await one.patch(f"/admin/users/{uid}", json={"role": "viewer"}, headers=admin)).status_code == 200
    elif change == "logout":
        assert (await one.post("/v1/auth/logout", json={"refresh_token": tokens["refresh_token"]})).status_code == 204
    else:
        assert (await one.post("/v1/auth/logout-all", headers=user)).status_code == 204
    took = await until(lambda: refused_everywhere(replicas, user), f"{change} reaching both replicas")
    print(f"{change}: refused at both replicas after {took:.3f}s")


async def test_defect1_demoted_admin_token_cannot_mint_admin_keys_or_restore_itself(replicas):
    one, two = replicas
    admin = bearer((await login(one))["access_token"])
    uid, email = await make_user(one, admin, role="admin")
    old = bearer((await login(one, email, STRONG))["access_token"])
    assert (await two.get("/admin/users", headers=old)).status_code == 200
    assert (await one.patch(f"/admin/users/{uid}", json={"role": "viewer"}, headers=admin)).status_code == 200

    async def both_refuse():
        r1 = await one.post("/admin/api-keys", json={"name": "x", "role": "admin"}, headers=old)
        r2 = await two.patch(f"/admin/users/{uid}", json={"role": "admin"}, headers=old)
        return r1.status_code == 401 and r2.status_code == 401

    await until(both_refuse, "the demotion reaching the gateways")
    users = (await one.get("/admin/users", headers=admin)).json()
    assert next(u for u in users if u["id"] == uid)["role"] == "viewer"


async def test_defect2_a_disabled_owners_keys_stop_despite_the_key_cache(replicas):
    one, two = replicas
    admin = bearer((await login(one))["access_token"])
    uid, email = await make_user(one, admin, role="admin")
    owner = bearer((await login(one, email, STRONG))["access_token"])
    key = await create_key(one, owner, role="admin")
    assert key["owner_id"] == uid
    minted = await one.post("/admin/api-keys", json={"name": "by-key", "role": "admin"},
                            headers={"X-API-Key": key["key"]})
    assert minted.status_code == 201 and minted.json()["owner_id"] == uid
    keys = [{"X-API-Key": key["key"]}, {"X-API-Key": minted.json()["key"]}]
    for g in replicas:  # now in every cache (TTL 300 s)
        for k in keys:
            r = await g.post("/v1/predict/fraud", json={}, headers=k)
            assert r.status_code == 200 and r.json()["headers"]["x-principal-owner"] == uid
    assert (await two.post(f"/admin/users/{uid}/disable", headers=admin)).status_code == 200

    async def dead():
        return all([await refused_everywhere(replicas, k) for k in keys])

    await until(dead, "the owner's disabling reaching the cached keys")
    r = await one.post("/admin/api-keys", json={"name": "again", "role": "admin"}, headers=keys[0])
    assert r.status_code == 401


async def test_a_revoked_key_stops_at_once_despite_the_key_cache(replicas):
    one, two = replicas
    admin = bearer((await login(one))["access_token"])
    key = await create_key(one, admin, role="service")
    k = {"X-API-Key": key["key"]}
    for g in replicas:
        assert (await g.post("/v1/predict/fraud", json={}, headers=k)).status_code == 200
    assert (await one.delete(f"/admin/api-keys/{key['id']}", headers=admin)).status_code == 200
    await until(lambda: refused_everywhere(replicas, k), "the key revocation reaching the gateways")


async def test_failed_authentication_is_limited_per_address_before_any_lookup(redis_url, auth_server, upstreams):
    settings = gw_settings(redis_url, auth_server, upstreams, auth_failures_per_minute=10)
    attacker = await client_at(settings, f"192.0.2.{secrets.randbelow(200) + 20}")
    bystander = await client_at(settings, f"198.18.0.{secrets.randbelow(200) + 20}")
    try:
        misses = REGISTRY.get_sample_value("aistack_gateway_apikey_cache_total", {"result": "miss"}) or 0.0
        codes = []
        for _ in range(40):
            r = await attacker.post("/v1/predict/fraud", json={}, headers={"X-API-Key": f"ak_{secrets.token_hex(4)}_"
                                                                                       f"{secrets.token_urlsafe(20)}"})
            codes.append(r.status_code)
        after = REGISTRY.get_sample_value("aistack_gateway_apikey_cache_total", {"result": "miss"}) or 0.0
        assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}, codes
        assert after - misses == 10  # 30 of the 40 never reached auth
        r = await attacker.post("/v1/predict/fraud", json={}, headers={"Authorization": "Bearer x.y.z"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "too_many_failed_authentications"
        token = (await login(bystander))["access_token"]  # another address is not affected
        assert (await bystander.post("/v1/predict/fraud", json={}, headers=bearer(token))).status_code == 200
    finally:
        await close(attacker)
        await close(bystander)


def _b64(doc) -> str:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize("header", [
    {"alg": ["RS256"], "kid": "k"}, {"alg": {"a": 1}, "kid": "k"}, {"alg": "RS256\u00e9\u4e2d\U0001f600", "kid": "k"},
    {"alg": 'RS256", error="x', "kid": "k"}, {"alg": "RS256", "kid": {"k": 1}}, ["a", "list"], "a string", 42,
    b"\xff\xfe not json"])
async def test_defect6_malformed_jwt_headers_are_401_with_a_safe_challenge(gw, header):
    token = f"{_b64(header)}.{_b64({'sub': 'x'})}.c2ln"
    r = await gw.post("/v1/predict/fraud", json={}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    challenge = r.headers["www-authenticate"]
    assert challenge.isascii() and challenge.count('"') % 2 == 0 and 'error="x' not in challenge


async def test_principal_owner_is_forwarded_and_cannot_be_forged(gw):
    tokens = await login(gw)
    user = bearer(tokens["access_token"])
    me = (await gw.get("/v1/auth/me", headers=user)).json()
    r = await gw.post("/v1/predict/fraud", json={}, headers={**user, "X-Principal-Owner": "mallory"})
    assert r.json()["headers"]["x-principal-owner"] == me["id"]
    key = await create_key(gw, user, role="service")
    r = await gw.post("/v1/predict/fraud", json={}, headers={"X-API-Key": key["key"], "X-Principal-Owner": "mallory"})
    sent = r.json()["headers"]
    assert sent["x-principal"] == f"apikey:{key['id']}" and sent["x-principal-owner"] == me["id"]


async def test_metrics_and_api_docs_are_not_public(gw):
    for path in ("/metrics", "/openapi.json"):
        assert (await gw.get(path)).status_code == 401, path
    for path in ("/docs", "/redoc"):
        assert (await gw.get(path)).status_code == 404, path
    admin = bearer((await login(gw))["access_token"])
    assert "aistack_http_requests_total" in (await gw.get("/metrics", headers=admin)).text
    assert (await gw.get("/metrics", headers={"X-Internal-Token": INTERNAL_TOKEN})).status_code == 200
    assert (await gw.get("/metrics", headers={"X-Internal-Token": "wrong"})).status_code == 401
    assert (await gw.get("/metrics", headers=bearer(INTERNAL_TOKEN))).status_code == 200  # Prometheus' way
    assert (await gw.get("/openapi.json", headers=admin)).json()["info"]["title"] == "aistack gateway"


async def test_no_internal_address_in_ready_or_redirects(redis_url, auth_server, upstreams):
    settings = gw_settings(redis_url, auth_server, upstreams, orchestrator_urls="http://127.0.0.1:9",
                           eject_after_failures=1)
    c = await client_at(settings, random_ip())
    try:
        admin = bearer((await login(c))["access_token"])
        await c.post("/v1/predict/fraud", json={}, headers=admin)  # ejects the dead orchestrator replica
        ready = await c.get("/ready")
        assert ready.status_code == 503
        assert "127.0.0.1" not in ready.text and ":9" not in ready.text and auth_server.url not in ready.text
        r = await c.get("/admin/users/", headers=admin)
        location = r.headers.get("location", "")
        assert "127.0.0.1" not in location and "://" not in location, (r.status_code, location)
    finally:
        await close(c)
