"""The audit log (docs/privacy.md) with real Postgres and Redis: auth's own admin actions, events of
other services through the stream auth:audit:events (idempotent, at least once), filters, admin-only
reading and the internal endpoint's token."""
from __future__ import annotations

import secrets

import httpx
import pytest

from services.auth.app import create_app
from services.chassis.clients import redis_client
from services.chassis.internal import AUDIT_STREAM, publish_audit
from tests.conftest import schema_database
from tests.integration.test_auth_service import auth_settings, bearer, login

TOKEN = secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def audit_db(postgres_server_url):
    with schema_database(postgres_server_url, "auth") as url:
        yield url


@pytest.fixture
async def client(audit_db, private_redis_url):
    app = create_app(auth_settings(audit_db, private_redis_url, audit_consumer=False, internal_token=TOKEN))
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://auth") as c:
        c.app = app
        yield c


async def admin_headers(c) -> dict:
    r = await login(c)
    assert r.status_code == 200, r.text
    return bearer(r.json())


async def entries(c, headers, **params) -> list[dict]:
    r = await c.get("/admin/audit", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["entries"]


async def test_auth_admin_actions_are_recorded_with_actor_and_time(client):
    h = await admin_headers(client)
    me = (await client.get("/v1/auth/me", headers=h)).json()
    email = f"a{secrets.token_hex(3)}@example.test"
    user = (await client.post("/admin/users", json={"email": email, "password": "lantern-orbit-7731"}, headers=h)).json()
    await client.patch(f"/admin/users/{user['id']}", json={"role": "developer"}, headers=h)
    key = (await client.post("/admin/api-keys", json={"name": "ci"}, headers=h)).json()
    await client.delete(f"/admin/api-keys/{key['id']}", headers=h)
    kid = (await client.post("/admin/signing-keys/rotate", headers=h)).json()["kid"]
    got = await entries(client, h, actor=me["id"], limit=5)
    assert [e["action"] for e in got] == ["signing_key.rotate", "api_key.revoke", "api_key.create", "user.update",
                                          "user.create"]
    assert got[0]["target"] == kid and got[4]["target"] == user["id"]
    assert all(e["time"] and e["service"] == "auth" and e["actor_role"] == "admin" for e in got)
    assert got[3]["details"] == {"role": "developer"}
    text = str(got)
    assert email not in text and key["key"] not in text and "password" not in text
    # Filters and paging.
    assert [e["action"] for e in await entries(client, h, action="api_key")] [:2] == ["api_key.revoke",
                                                                                      "api_key.create"]
    page = await entries(client, h, limit=2)
    older = await entries(client, h, limit=2, before_id=page[-1]["id"])
    assert older[0]["id"] < page[-1]["id"]


async def test_other_services_events_arrive_through_the_stream_once(client, private_redis_url):
    h = await admin_headers(client)
    audit = client.app.state.audit
    await audit.ensure_group()
    r = redis_client(private_redis_url)
    try:
        target = f"model-{secrets.token_hex(3)}"
        assert await publish_audit(r, "u-1", "policy.set", target, service="orchestrator", actor_role="admin",
                                   details={"policy_id": 7, "reason": "canary"})
        assert await audit.consume_once("test-consumer", block_ms=None) >= 1
        [e] = await entries(client, h, target=target)
        assert (e["service"], e["actor"], e["action"], e["details"]) == ("orchestrator", "u-1", "policy.set",
                                                                         {"policy_id": 7, "reason": "canary"})
        # Redelivery (a crash between insert and ack) stores nothing twice.
        entry_id, fields = (await r.xrevrange(AUDIT_STREAM, count=1))[0]
        assert await audit.store_entries([(entry_id, fields)]) == 1
        assert len(await entries(client, h, target=target)) == 1
        # A dead replica's pending entries are claimed by another consumer (after the idle time).
        await publish_audit(r, "u-2", "cache.flush", target, service="orchestrator")
        await r.xreadgroup("auth", "dead-replica", {AUDIT_STREAM: ">"}, count=10)
        assert await r.xpending(AUDIT_STREAM, "auth") and (await r.xpending(AUDIT_STREAM, "auth"))["pending"] == 1
        claimed = await r.xautoclaim(AUDIT_STREAM, "auth", "test-consumer", min_idle_time=0, start_id="0-0")
        assert await audit.store_entries(claimed[1]) == 1
        assert {e["action"] for e in await entries(client, h, target=target)} == {"policy.set", "cache.flush"}
    finally:
        await r.aclose()


async def test_reading_needs_admin_and_the_internal_endpoint_needs_the_token(client):
    h = await admin_headers(client)
    email = f"v{secrets.token_hex(3)}@example.test"
    await client.post("/admin/users", json={"email": email, "password": "lantern-orbit-7731", "role": "viewer"}, headers=h)
    viewer = bearer((await login(client, email, "lantern-orbit-7731")).json())
    assert (await client.get("/admin/audit", headers=viewer)).status_code == 403
    event = {"service": "features", "actor": "u-9", "action": "pii.rotate", "target": "people"}
    assert (await client.post("/internal/audit", json=event)).status_code == 403
    assert (await client.post("/internal/audit", json=event, headers={"X-Internal-Token": "nope"})).status_code == 403
    ok = await client.post("/internal/audit", json=event, headers={"X-Internal-Token": TOKEN})
    assert ok.status_code == 202, ok.text
    assert [e["action"] for e in await entries(client, h, service="features")] == ["pii.rotate"]
