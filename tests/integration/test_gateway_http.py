"""The gateway over real HTTP with real Postgres and Redis: auth runs as a real server, the
upstreams are small echo servers (they answer with what the gateway sent them)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as SRoute

from services.auth import keys as keymod
from services.auth.app import create_app as auth_app
from services.chassis.clients import asyncpg_url
from services.gateway.app import create_app as gateway_app
from services.gateway.settings import GatewaySettings
from tests.conftest import ServedApp as Server
from tests.conftest import free_port
from tests.integration.test_auth_service import (  # noqa: F401
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    INTERNAL_TOKEN,
    auth_db,
    auth_settings,
)


def echo_app(name: str) -> Starlette:
    async def echo(request: Request):
        body = await request.body()
        return JSONResponse({"replica": name, "method": request.method, "path": request.url.path,
                             "headers": dict(request.headers), "body_len": len(body)},
                            headers={"Server-Timing": "model;dur=1.0"})
    return Starlette(routes=[SRoute("/{path:path}", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])])


@pytest.fixture(scope="module")
def auth_server(auth_db, redis_url):  # noqa: F811
    with Server(auth_app(auth_settings(auth_db, redis_url))) as s:
        yield s


@pytest.fixture(scope="module")
def upstreams():
    with Server(echo_app("a")) as a, Server(echo_app("b")) as b:
        yield a, b


def gw_settings(redis_url, auth_server, upstreams, **kw) -> GatewaySettings:
    base = {"redis_url": redis_url, "ready_max_cpu_percent": 100, "ready_max_memory_percent": 100,
                "auth_urls": auth_server.url, "orchestrator_urls": ",".join(u.url for u in upstreams),
                "features_urls": upstreams[0].url, "pipeline_urls": upstreams[0].url, "api_key_cache_ttl_s": 1.0, "jwks_min_refetch_s": 0.5,
                "internal_token": INTERNAL_TOKEN}
    base.update(kw)
    return GatewaySettings(**base)


async def gateway_client(settings):
    app = gateway_app(settings)
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app, client=("192.0.2.10", 1234)),
                               base_url="http://gw", timeout=30)
    client.app, client._ctx = app, ctx
    return client


async def close(client):
    await client.aclose()
    await client._ctx.__aexit__(None, None, None)


@pytest.fixture
async def gw(redis_url, auth_server, upstreams):
    c = await gateway_client(gw_settings(redis_url, auth_server, upstreams))
    yield c
    await close(c)


async def login(gw, email=ADMIN_EMAIL, password=ADMIN_PASSWORD) -> dict:
    r = await gw.post("/v1/auth/token", data={"username": email, "password": password})
    assert r.status_code == 200, r.text
    return r.json()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# -- tokens that must be refused ------------------------------------------------------------------
def b64(doc) -> str:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def signing_key(database_url: str) -> tuple[str, str, str]:
    """(kid, private PEM, public PEM) of auth's active key, straight from its table."""
    engine = create_async_engine(asyncpg_url(database_url))
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT kid, private_enc, public_pem FROM auth.signing_keys "
                                       "WHERE retired_at IS NULL"))).one()
    await engine.dispose()
    return row[0], keymod.decrypt_private(keymod.fernet(None), row[1]), row[2]


def claims(**over) -> dict:
    now = int(time.time())
    base = {"iss": "aistack-auth", "aud": "aistack", "sub": "someone", "iat": now, "nbf": now, "exp": now + 300,
            "jti": secrets.token_hex(8), "scope": "predict", "role": "developer"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def bad_tokens(kid: str, private_pem: str, public_pem: str, valid: str) -> dict[str, str]:
    from jose import jwt

    def sign(c, key=private_pem, k=kid, alg="RS256"):
        return jwt.encode(c, key, algorithm=alg, headers={"kid": k})

    now = int(time.time())
    hs_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64(claims(scope='predict admin'))}"
    hs_sig = b64(hmac.new(public_pem.encode(), hs_input.encode(), hashlib.sha256).digest())
    other_private, _ = keymod.generate_keypair("RS256")
    head, payload, sig = valid.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    tampered["scope"] += " admin"
    return {
        "alg_none": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{b64(claims())}.",
        "hs256_with_public_key": f"{hs_input}.{hs_sig}",
        "expired": sign(claims(iat=now - 4000, nbf=now - 4000, exp=now - 3000)),
        "not_yet_valid": sign(claims(nbf=now + 3000, exp=now + 4000)),
        "wrong_aud": sign(claims(aud="someone-else")),
        "wrong_iss": sign(claims(iss="https://evil.example")),
        "unknown_kid": sign(claims(), key=other_private, k="no-such-kid"),
        "tampered_payload": f"{head}.{b64(tampered)}.{sig}",
        "missing_exp": sign(claims(exp=None)),
        "garbage": "not-a-jwt",
    }


async def test_token_matrix_is_401_and_a_good_token_passes(gw, auth_db):  # noqa: F811
    valid = (await login(gw))["access_token"]
    ok = await gw.post("/v1/predict/fraud", json={"inputs": {}}, headers=bearer(valid))
    assert ok.status_code == 200, ok.text
    kid, private_pem, public_pem = await signing_key(auth_db)
    # A token we sign ourselves with auth's real key passes: the rejections below are about the flaw.
    from jose import jwt
    assert (await gw.post("/v1/predict/fraud", json={}, headers=bearer(
        jwt.encode(claims(), private_pem, algorithm="RS256", headers={"kid": kid})))).status_code == 200
    for name, token in bad_tokens(kid, private_pem, public_pem, valid).items():
        r = await gw.post("/v1/predict/fraud", json={"inputs": {}}, headers=bearer(token))
        assert r.status_code == 401, (name, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer"), name
        assert r.json()["error"]["code"] == "unauthorized", name
    r = await gw.post("/v1/predict/fraud", json={"inputs": {}})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


async def test_principal_headers_are_set_and_client_ones_stripped(gw):
    tokens = await login(gw)
    r = await gw.post("/v1/predict/fraud", json={"inputs": {}}, headers={
        **bearer(tokens["access_token"]), "X-Principal": "mallory", "X-Principal-Scopes": "admin",
        "X-Forwarded-For": "6.6.6.6"})
    assert r.status_code == 200, r.text
    sent = r.json()["headers"]
    me = (await gw.get("/v1/auth/me", headers=bearer(tokens["access_token"]))).json()
    assert sent["x-principal"] == me["id"] and "admin" in sent["x-principal-scopes"].split()
    assert "authorization" not in sent  # upstreams get the principal, not the credential
    assert sent["x-forwarded-for"] == "192.0.2.10"
    assert "gateway;dur=" in r.headers["server-timing"] and "model;dur=1.0" in r.headers["server-timing"]


async def test_scopes_are_checked_per_route(gw):
    admin = bearer((await login(gw))["access_token"])
    email = f"viewer{secrets.token_hex(3)}@example.test"
    r = await gw.post("/admin/users", json={"email": email, "password": "lantern-orbit-7731", "role": "viewer"},
                      headers=admin)
    assert r.status_code == 201, r.text
    viewer = bearer((await login(gw, email, "lantern-orbit-7731"))["access_token"])
    assert (await gw.post("/v1/predict/fraud", json={}, headers=viewer)).status_code == 403
    assert (await gw.post("/v1/features/push", json={}, headers=viewer)).status_code == 403
    assert (await gw.get("/admin/models", headers=viewer)).status_code == 403
    assert (await gw.get("/admin/users", headers=viewer)).status_code == 403
    r = await gw.post("/v1/features/online", json={}, headers=viewer)
    assert r.status_code == 200 and r.json()["path"] == "/v1/features/online"
    assert (await gw.get("/admin/users", headers=admin)).status_code == 200
    r = await gw.post("/v1/jobs", json={}, headers=admin)
    assert r.status_code == 200 and r.json()["path"] == "/v1/jobs"


async def test_login_refresh_logout_through_the_gateway(gw):
    tokens = await login(gw)
    r = await gw.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert (await gw.post("/v1/predict/m", json={}, headers=bearer(fresh["access_token"]))).status_code == 200
    assert (await gw.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})).status_code == 401
    assert (await gw.post("/v1/auth/refresh", json={"refresh_token": fresh["refresh_token"]})).status_code == 401
    again = await login(gw)
    assert (await gw.post("/v1/auth/logout", json={"refresh_token": again["refresh_token"]})).status_code == 204
    assert (await gw.post("/v1/auth/refresh", json={"refresh_token": again["refresh_token"]})).status_code == 401


async def create_key(gw, admin, **body) -> dict:
    r = await gw.post("/admin/api-keys", json={"name": "test", **body}, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()


async def test_api_key_works_and_revocation_takes_effect_within_the_cache_ttl(gw):
    admin = bearer((await login(gw))["access_token"])
    created = await create_key(gw, admin, role="service", scopes=["predict"])
    key = {"X-API-Key": created["key"]}
    r = await gw.post("/v1/predict/fraud", json={}, headers=key)
    assert r.status_code == 200, r.text
    assert r.json()["headers"]["x-principal"] == f"apikey:{created['id']}"
    assert "x-api-key" not in r.json()["headers"]
    assert (await gw.post("/v1/predict/fraud", json={}, headers=bearer(created["key"]))).status_code == 200
    assert (await gw.post("/v1/jobs", json={}, headers=key)).status_code == 403
    assert (await gw.delete(f"/admin/api-keys/{created['id']}", headers=admin)).status_code == 200
    # Within api_key_cache_ttl_s (1 s here) the revocation reaches the gateway; poll, no timing assertion.
    deadline = time.monotonic() + 30
    while (await gw.post("/v1/predict/fraud", json={}, headers=key)).status_code == 200:
        assert time.monotonic() < deadline, "revocation never took effect"
        await asyncio.sleep(0.1)
    r = await gw.post("/v1/predict/fraud", json={}, headers=key)
    assert r.status_code == 401


async def test_rate_limit_answers_429_with_headers_and_holds_across_two_gateways(redis_url, auth_server, upstreams):
    settings = gw_settings(redis_url, auth_server, upstreams, rate_limit_rpm={"service": 1000})
    one, two = await gateway_client(settings), await gateway_client(settings)
    try:
        admin = bearer((await login(one))["access_token"])
        key = {"X-API-Key": (await create_key(one, admin, role="service", rate_limit_rpm=6))["key"]}
        start = time.monotonic()
        statuses = []
        for i in range(14):
            r = await (one if i % 2 else two).post("/v1/predict/fraud", json={}, headers=key)
            statuses.append(r.status_code)
            if r.status_code == 200:
                assert r.headers["ratelimit-limit"] == "6"
                assert int(r.headers["ratelimit-remaining"]) >= 0
                assert 'w=60' in r.headers["ratelimit-policy"]
        elapsed = time.monotonic() - start
        assert set(statuses) == {200, 429}
        # One bucket for both replicas: 6 to start, refilled at 6/min while the test ran.
        assert statuses.count(200) <= 6 + int(elapsed * 6 / 60) + 1
        assert statuses[:6] == [200] * 6
        r = await one.post("/v1/predict/fraud", json={}, headers=key)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1 and r.headers["ratelimit-remaining"] == "0"
        assert int(r.headers["ratelimit-reset"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"
    finally:
        await close(one)
        await close(two)


async def test_embeddings_count_input_tokens(redis_url, auth_server, upstreams):
    gw = await gateway_client(gw_settings(redis_url, auth_server, upstreams, rate_limit_tpm={"service": 100}))
    try:
        admin = bearer((await login(gw))["access_token"])
        key = {"X-API-Key": (await create_key(gw, admin, role="service"))["key"]}
        text_80_tokens = "x" * 320
        assert (await gw.post("/v1/embeddings", json={"input": text_80_tokens}, headers=key)).status_code == 200
        r = await gw.post("/v1/embeddings", json={"input": [text_80_tokens]}, headers=key)
        assert r.status_code == 429 and 'comment="tokens"' in r.headers["ratelimit-policy"]
        r = await gw.post("/v1/embeddings", json={"input": "x" * 1000}, headers=key)
        assert r.status_code == 413
    finally:
        await close(gw)


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_down_fails_open_or_closed(auth_server, upstreams, fail_open):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    gw = await gateway_client(gw_settings(dead, auth_server, upstreams, rate_limit_fail_open=fail_open))
    try:
        token = (await login(gw)) if fail_open else None
        if fail_open:
            # Rate limits fail open, but revocations can't be followed without Redis: an
            # authenticated request fails closed (issue 13), a public one passes.
            r = await gw.post("/v1/predict/fraud", json={}, headers=bearer(token["access_token"]))
            assert r.status_code == 503 and r.json()["error"]["code"] == "revocation_state_unavailable"
            assert r.headers["retry-after"]
            metrics = (await gw.get("/metrics", headers={"X-Internal-Token": INTERNAL_TOKEN})).text
            assert 'aistack_gateway_ratelimit_redis_errors_total{mode="open"}' in metrics
        else:
            r = await gw.post("/v1/auth/token", data={"username": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
            assert r.status_code == 503 and r.headers["retry-after"]
    finally:
        await close(gw)


async def test_body_limit_is_413(redis_url, auth_server, upstreams):
    gw = await gateway_client(gw_settings(redis_url, auth_server, upstreams, max_body_bytes=1000))
    try:
        token = bearer((await login(gw))["access_token"])
        r = await gw.post("/v1/predict/fraud", content=b"x" * 1001, headers=token)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        async def chunks():  # no Content-Length: counted while reading
            for _ in range(3):
                yield b"y" * 400
        r = await gw.post("/v1/predict/fraud", content=chunks(), headers=token)
        assert r.status_code == 413
        assert (await gw.post("/v1/predict/fraud", content=b"{}", headers=token)).status_code == 200
    finally:
        await close(gw)


async def test_dead_replica_is_skipped_and_ejected(redis_url, auth_server, upstreams):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await gateway_client(gw_settings(redis_url, auth_server, [upstreams[0]], eject_after_failures=2,
                                          orchestrator_urls=f"{dead},{upstreams[0].url}"))
    try:
        token = bearer((await login(gw))["access_token"])
        for _ in range(10):
            r = await gw.post("/v1/predict/fraud", json={}, headers=token)
            assert r.status_code == 200 and r.json()["replica"] == "a"
        pool = gw.app.state.gateway.proxies["orchestrator"].pool
        assert [r.url for r in pool.healthy()] == [upstreams[0].url]
    finally:
        await close(gw)


async def test_unknown_kid_after_rotation_refetches_the_jwks(gw):
    admin = bearer((await login(gw))["access_token"])
    await gw.get("/admin/users", headers=admin)  # JWKS cached now
    assert (await gw.post("/admin/signing-keys/rotate", headers=admin)).status_code == 200
    fresh = (await login(gw))["access_token"]  # signed with the new kid
    deadline = time.monotonic() + 30
    while (r := await gw.get("/admin/users", headers=bearer(fresh))).status_code != 200:
        assert r.status_code == 401 and time.monotonic() < deadline, r.text
        await asyncio.sleep(0.2)
    assert (await gw.get("/admin/users", headers=admin)).status_code == 200  # old kid still published
