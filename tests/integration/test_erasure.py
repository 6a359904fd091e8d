# ruff: noqa: F811 - fixtures imported from test_auth_service are used as parameters
"""Issue 20 at auth (real Postgres and Redis, the other services as small recording servers):
erasure freezes the subject before any service erases, retries a service until it confirms, and
its audit record says which services confirmed and when."""
from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as SRoute

from services.auth.app import create_app
from services.chassis.clients import asyncpg_url
from tests.conftest import ServedApp
from tests.integration.test_auth_service import (  # noqa: F401
    INTERNAL,
    auth_db,
    auth_settings,
    bearer,
    login,
)

STRONG = "lantern-orbit-7731"


class Owners:
    """Pipeline, orchestrator and features in one app: records each call with the subject's state
    in auth's tables at that moment; `fail` makes a service answer 503 that many times."""

    def __init__(self, database_url: str):
        self.database_url, self.calls, self.fail = database_url, [], {}

    async def state(self, principal: str) -> dict:
        engine = create_async_engine(asyncpg_url(self.database_url))
        try:
            async with engine.connect() as conn:
                if principal.startswith("apikey:"):
                    row = (await conn.execute(text("SELECT revoked_at IS NOT NULL FROM auth.api_keys WHERE id = :i"),
                                              {"i": principal[7:]})).first()
                    return {"key_revoked": row[0] if row else None}
                row = (await conn.execute(text("SELECT disabled FROM auth.users WHERE id = :i"),
                                          {"i": principal})).first()
                keys = (await conn.execute(text("SELECT count(*) FROM auth.api_keys WHERE owner_id = :i "
                                                "AND revoked_at IS NULL"), {"i": principal})).scalar()
                return {"disabled": row[0] if row else None, "live_keys": keys}
        finally:
            await engine.dispose()

    def app(self, service: str) -> Starlette:
        async def subjects(request: Request):
            if self.fail.get(service, 0) > 0:
                self.fail[service] -= 1
                return JSONResponse({"error": {"code": "down"}}, status_code=503)
            principal = request.path_params.get("principal", "")
            self.calls.append((service, request.method, principal,
                               await self.state(principal) if principal else {}, time.time()))
            return JSONResponse({"predictions": 1} if request.method == "DELETE" else {})
        return Starlette(routes=[SRoute("/internal/subjects/{principal:path}", subjects, methods=["GET", "DELETE"]),
                                 SRoute("/internal/subjects", subjects, methods=["GET", "DELETE"])])


async def erasure_client(auth_db, redis_url, owners_url: str, **kw):
    app = create_app(auth_settings(auth_db, redis_url, orchestrator_url=owners_url, pipeline_url=owners_url,
                                   features_url=owners_url, erase_retry_s=0.3, erase_attempts=1, **kw))
    ctx = app.router.lifespan_context(app)
    await ctx.__aenter__()
    c = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://auth", timeout=60)
    c.app, c._ctx = app, ctx
    return c


async def subject(c) -> tuple[str, str, str, dict]:
    """(user id, key id, api key, user headers): a developer with a key of their own and a link."""
    admin = bearer((await login(c)).json())
    email = f"e{secrets.token_hex(4)}@example.test"
    uid = (await c.post("/admin/users", json={"email": email, "password": STRONG, "role": "developer"},
                        headers=admin)).json()["id"]
    key = (await c.post("/admin/api-keys", json={"name": "k", "role": "developer", "owner_id": uid},
                        headers=admin)).json()
    assert (await c.post(f"/admin/users/{uid}/links", json={"entity": "customer", "entity_id": "C9"},
                         headers=admin)).status_code == 201
    user = bearer((await login(c, email, STRONG)).json())
    return uid, key["id"], key["key"], user


async def test_erasure_freezes_the_subject_before_any_service_erases(auth_db, redis_url):
    owners = Owners(auth_db)
    with ServedApp(owners.app("all")) as served:
        c = await erasure_client(auth_db, redis_url, served.url)
        r = aioredis.Redis.from_url(redis_url)
        try:
            uid, key_id, key, user = await subject(c)
            before = time.time()
            erased = await c.delete("/v1/me", headers=user)
            assert erased.status_code == 200, erased.text
            doc = erased.json()
            assert doc["state"] == "done" and set(doc["confirmed"]) == {"pipeline", "orchestrator", "features", "auth"}
            deletes = [call for call in owners.calls if call[1] == "DELETE"]
            assert {p for _, _, p, _, _ in deletes} >= {uid, f"apikey:{key_id}"}
            for _, _, principal, state, _ in deletes:  # frozen at every single erase call
                if principal == uid:
                    assert state == {"disabled": True, "live_keys": 0}, state
                elif principal.startswith("apikey:"):
                    assert state == {"key_revoked": True}, state
            # Revoked at the gateways before the first erase call.
            published = await r.hgetall("auth:revocations")
            assert float(published[f"user:{uid}".encode()]) >= before
            assert float(published[f"apikey:{key_id}".encode()]) < min(t for *_, t in deletes)
            assert (await c.post("/internal/introspect", json={"api_key": key}, headers=INTERNAL)).json() == {
                "active": False}
        finally:
            await r.aclose()
            await c.aclose()
            await c._ctx.__aexit__(None, None, None)


async def test_a_service_that_is_down_is_retried_until_it_confirms(auth_db, redis_url):
    owners = Owners(auth_db)
    owners.fail["all"] = 2  # the first two calls fail
    with ServedApp(owners.app("all")) as served:
        c = await erasure_client(auth_db, redis_url, served.url)
        try:
            uid, _, key, user = await subject(c)
            erased = await c.delete("/v1/me", headers=user)
            assert erased.status_code == 200, erased.text
            doc = erased.json()
            assert doc["state"] == "pending" and "pipeline" in doc["pending"], doc
            # Frozen meanwhile: the user can neither log in nor use the key.
            assert (await c.get("/v1/auth/me", headers=user)).status_code == 401
            assert not (await c.post("/internal/introspect", json={"api_key": key}, headers=INTERNAL)).json()["active"]
            admin = bearer((await login(c)).json())

            async def record():
                entries = (await c.get("/admin/audit", params={"action": "subject.erase"}, headers=admin)).json()
                return [e for e in entries["entries"] if e["details"]["erasure_id"] == doc["erasure_id"]]

            deadline = time.monotonic() + 30
            while not (found := await record()):
                assert time.monotonic() < deadline, "the background loop never finished the erasure"
                await asyncio.sleep(0.2)
            [entry] = found
            confirmed = entry["details"]["confirmed"]
            assert set(confirmed) == {"pipeline", "orchestrator", "features", "auth"}
            assert all(isinstance(at, str) and at[:4].isdigit() for at in confirmed.values())
            assert uid not in str(entry)
            users = (await c.get("/admin/users", params={"limit": 1000}, headers=admin)).json()
            assert uid not in {u["id"] for u in users}
        finally:
            await c.aclose()
            await c._ctx.__aexit__(None, None, None)
