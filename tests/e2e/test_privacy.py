"""Privacy across the running stack (docs/privacy.md): a user's predictions, feedback and linked PII
features are exported by GET /v1/me/export and erased by DELETE /v1/me in every service (cached
responses and Redis keys included), PII features are encrypted at rest and never logged, admin
actions land in the audit log, and internal endpoints are not reachable through the gateway."""
from __future__ import annotations

import asyncio
import json
import secrets

import asyncpg
import httpx
import pytest
import redis

from tests.conftest import poll
from tests.e2e.conftest import login

pytestmark = pytest.mark.e2e




def sql(database_url: str, query: str, *args):
    async def run():
        conn = await asyncpg.connect(database_url)
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()
    return asyncio.run(run())


@pytest.fixture(scope="module")
def gw(stack):
    with httpx.Client(base_url=stack.url("gateway"), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def pii_view(stack) -> tuple[str, str]:
    """A view of a `person` entity with one PII feature (registry admin straight on the features service)."""
    suffix = secrets.token_hex(3)
    entity, view = f"person_{suffix}", f"person_profile_{suffix}"
    with httpx.Client(base_url=stack.url("features"), timeout=30) as f:
        assert f.post("/admin/features/entities", json={"name": entity, "join_key": "person_id"}).status_code == 201
        spec = {"name": view, "entity": entity, "features": [
            {"name": "national_id", "dtype": "string", "pii": True}, {"name": "score", "dtype": "float"}]}
        resp = f.post("/admin/features/views", json=spec)
        assert resp.status_code == 201, resp.text
        got = f.get(f"/admin/features/views/{view}").json()
        assert [x["pii"] for x in got["features"]] == [True, False]
    return entity, view


def fraud_row() -> dict:
    return {"amount": round(10 + secrets.randbelow(10**6) / 1000, 3), "txn_count_24h": 3, "txn_amount_24h": 120.0,
            "avg_amount_30d": 35.0, "account_age_days": 400, "chargebacks_90d": 0, "distinct_merchants_7d": 2}


def test_export_then_erase_across_the_services(stack, gw, r, database_url, admin_headers, pii_view):
    entity, view = pii_view
    email, password = f"subject-{secrets.token_hex(4)}@example.test", "subject-password-1"
    created = gw.post("/admin/users", json={"email": email, "password": password, "role": "developer"},
                      headers=admin_headers)
    assert created.status_code == 201, created.text
    uid = created.json()["id"]
    person = f"P{secrets.token_hex(4)}"
    link = gw.post(f"/admin/users/{uid}/links", json={"entity": entity, "entity_id": person}, headers=admin_headers)
    assert link.status_code == 201, link.text
    tokens = login(stack.url("gateway"), email, password).json()
    user = {"Authorization": f"Bearer {tokens['access_token']}"}

    # A PII feature: sealed in Postgres and Redis, readable through the API, absent from every log.
    secret_value = f"NID-{secrets.token_hex(8)}"
    push = gw.post("/v1/features/push", headers=user, json={
        "view": view, "rows": [{"person_id": person, "national_id": secret_value, "score": 0.25}]})
    assert push.status_code == 200, push.text
    [stored] = sql(database_url, "SELECT values::text AS v FROM features.offline_rows WHERE view = $1 "
                                 "AND entity_key = $2", view, person)
    assert secret_value not in stored["v"] and '"$pii"' in stored["v"]
    online_raw = r.hget(f"features:online:{view}:{person}", "national_id")
    assert online_raw is not None and secret_value.encode() not in online_raw and b"$pii" in online_raw
    online = gw.post("/v1/features/online", headers=user,
                     json={"entity": entity, "ids": [person], "features": [view]})
    assert online.status_code == 200, online.text
    assert online.json()["results"][0]["values"]["national_id"] == secret_value

    # Predictions (one cached) and feedback.
    row = fraud_row()
    first = gw.post("/v1/predict/fraud", json={"inputs": row}, headers=user)
    assert first.status_code == 200, first.text
    pid = first.json()["prediction_id"]
    assert gw.post("/v1/predict/fraud", json={"inputs": row}, headers=user).json()["cached"] is True
    fb = gw.post("/v1/feedback", json={"prediction_id": pid, "label": 1}, headers=user)
    assert fb.status_code == 202, fb.text

    def exported():
        doc = gw.get("/v1/me/export", headers=user)
        assert doc.status_code == 200, doc.text
        doc = doc.json()
        persisted = any(p["prediction_id"] == pid for p in doc["predictions"]) and \
            any(f["prediction_id"] == pid for f in doc["feedback"])
        return doc if persisted else None

    doc = poll(exported, "the pipeline to persist the prediction log (PIPELINE_PERSIST_EVERY_S)")
    assert doc["account"]["email"] == email and doc["account"]["id"] == uid
    assert doc["linked_entities"] == [{"entity": entity, "entity_id": person}]
    assert all(p["principal"] == uid for p in doc["predictions"])
    assert {p["prediction_id"] for p in doc["prediction_log"]} >= {pid}
    [features] = doc["features"]
    assert [o["values"]["national_id"] for o in features["offline"]] == [secret_value]
    assert [o["values"]["national_id"] for o in features["online"]] == [secret_value]
    assert "key_hash" not in json.dumps(doc) and "password_hash" not in json.dumps(doc)
    input_hash = next(p["input_hash"] for p in doc["predictions"] if p["prediction_id"] == pid)
    cache_key = f"orchestrator:cache:fraud:{input_hash}"
    assert r.exists(cache_key) and r.exists(f"orchestrator:prediction:{pid}")

    # Erase: every service, then the account.
    erased = gw.delete("/v1/me", headers=user)
    assert erased.status_code == 200, erased.text
    result = erased.json()
    counts = result["counts"]
    assert counts["pipeline"]["predictions"] >= 2 and counts["pipeline"]["feedback"] >= 1
    assert counts["orchestrator"]["cached_responses"] >= 1 and counts["features"]["offline_rows"] == 1
    assert counts["auth"]["users"] == 1
    assert not r.exists(cache_key) and not r.exists(f"orchestrator:prediction:{pid}")
    assert not r.exists(f"features:online:{view}:{person}")
    assert sql(database_url, "SELECT 1 FROM pipeline.predictions WHERE principal = $1", uid) == []
    assert sql(database_url, "SELECT 1 FROM pipeline.feedback WHERE prediction_id = $1", pid) == []
    assert sql(database_url, "SELECT 1 FROM features.offline_rows WHERE view = $1", view) == []
    assert sql(database_url, "SELECT 1 FROM auth.users WHERE id = $1::uuid", uid) == []
    log_entries = r.xrange("orchestrator:predictions", count=100_000)
    assert not any(f.get(b"principal") == uid.encode() for _, f in log_entries)
    assert login(stack.url("gateway"), email, password).status_code == 401
    assert gw.get("/v1/me/export", headers=user).status_code == 401  # the account is gone

    # Idempotent: the admin erase of the same id finds nothing left and still answers 200.
    again = gw.delete(f"/admin/users/{uid}/data", headers=admin_headers)
    assert again.status_code == 200, again.text
    assert again.json()["counts"]["pipeline"].get("predictions", 0) == 0
    assert again.json()["counts"]["auth"]["users"] == 0

    # The audit record: counts and a keyed hash, no e-mail and no user id in clear.
    audit = gw.get("/admin/audit", params={"action": "subject.erase"}, headers=admin_headers)
    assert audit.status_code == 200, audit.text
    [record] = [e for e in audit.json()["entries"] if e["details"]["erasure_id"] == result["erasure_id"]]
    text = json.dumps(record)
    assert email not in text and uid not in text and person not in text
    assert record["details"]["requested_by"] == "subject" and record["details"]["counts"]["auth"]["users"] == 1
    everything = json.dumps(gw.get("/admin/audit", params={"limit": 1000}, headers=admin_headers).json())
    assert uid not in everything and email not in everything  # earlier entries about the user pseudonymised

    # PII never logged, by any service.
    for path in (stack.data_dir / "logs").glob("*.log"):
        assert secret_value not in path.read_text(errors="replace"), f"PII value in {path.name}"


def test_admin_actions_are_audited_across_services(stack, gw, admin_headers):
    current = gw.get("/admin/models/fraud/policy", headers=admin_headers)
    assert current.status_code == 200, current.text
    reason = f"audit-{secrets.token_hex(4)}"
    put = gw.put("/admin/models/fraud/policy", headers=admin_headers,
                 json={"policy": current.json()["policy"], "reason": reason})
    assert put.status_code == 200, put.text

    def found():
        entries = gw.get("/admin/audit", params={"action": "policy", "service": "orchestrator"},
                         headers=admin_headers).json()["entries"]
        return [e for e in entries if e["details"].get("reason") == reason]

    [entry] = poll(found, "the orchestrator's audit event to reach auth", timeout=30)
    assert entry["action"] == "policy.set" and entry["target"] == "fraud" and entry["actor"]
    assert entry["time"] and entry["actor_role"] == "admin"
    # (signing-key rotation and the other auth actions: tests/integration/test_audit.py; rotating here
    # would disturb the other modules sharing this stack)
    viewer_email = f"viewer-{secrets.token_hex(4)}@example.test"
    gw.post("/admin/users", json={"email": viewer_email, "password": "viewer-password-1", "role": "viewer"},
            headers=admin_headers)
    viewer = login(stack.url("gateway"), viewer_email, "viewer-password-1").json()
    denied = gw.get("/admin/audit", headers={"Authorization": f"Bearer {viewer['access_token']}"})
    assert denied.status_code == 403


def test_internal_endpoints_are_not_public(stack, gw, admin_headers):
    for path in ("/internal/subjects/x", "/internal/audit", "/internal/introspect"):
        assert gw.get(path, headers=admin_headers).status_code in (404, 405)
    for service in ("pipeline", "orchestrator"):
        assert httpx.get(f"{stack.url(service)}/internal/subjects/x", timeout=10).status_code == 403
        bad = httpx.get(f"{stack.url(service)}/internal/subjects/x", headers={"X-Internal-Token": "wrong"}, timeout=10)
        assert bad.status_code == 403
    assert httpx.get(f"{stack.url('features')}/internal/subjects", params={"entity": "customer", "ids": "C0001"},
                     timeout=10).status_code == 403
