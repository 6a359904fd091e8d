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


def distinct_row() -> dict:
    """A fraud row whose amount (11+ significant characters) appears nowhere else by chance."""
    return {**fraud_row(), "amount": round(1000 + (secrets.randbelow(10**9) + 1) / 10**6, 6)}


def search_postgres(database_url: str, needles: list[str]) -> list[tuple[str, str]]:
    """(table, needle) for every table of every service schema whose rows mention a needle."""
    async def run():
        conn = await asyncpg.connect(database_url)
        try:
            tables = await conn.fetch("SELECT table_schema, table_name FROM information_schema.tables "
                                      "WHERE table_schema IN ('auth', 'orchestrator', 'features', 'pipeline') "
                                      "AND table_type = 'BASE TABLE'")
            found = []
            for t in tables:  # one scan per table, each row rendered as text once
                name = f'"{t["table_schema"]}"."{t["table_name"]}"'
                hits = await conn.fetch(f"SELECT DISTINCT n FROM (SELECT t::text AS x FROM {name} AS t) AS s, "
                                        f"unnest($1::text[]) AS n WHERE strpos(s.x, n) > 0", needles)
                found += [(name, h["n"]) for h in hits]
            return found
        finally:
            await conn.close()
    return asyncio.run(run())


def search_redis(r, needles: list[str]) -> list[tuple[str, str]]:
    """(key, needle) for every Redis key whose name or content mentions a needle (all types)."""
    found = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"string":
            content = [r.get(key) or b""]
        elif kind == b"hash":
            content = [b"%s=%s" % kv for kv in r.hgetall(key).items()]
        elif kind == b"stream":
            content = [b" ".join(k + b"=" + v for k, v in f.items()) for _, f in r.xrange(key, count=200_000)]
        elif kind == b"list":
            content = r.lrange(key, 0, -1)
        elif kind == b"set":
            content = list(r.smembers(key))
        elif kind == b"zset":
            content = r.zrange(key, 0, -1)
        else:
            content = []
        blob = key + b"\n" + b"\n".join(c if isinstance(c, bytes) else str(c).encode() for c in content)
        found += [(key.decode(errors="replace"), n) for n in needles if n.encode() in blob]
    return found


def search_files(root, needles: list[str]) -> list[tuple[str, str]]:
    found = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [(str(path.relative_to(root)), n) for n in needles if n.encode() in data]
    return found


# What docs/privacy.md lists as kept after an erasure, by design:
# - auth's revocation entries `user:<id>` / `apikey:<id>` (table auth.revocations, Redis hash
#   auth:revocations) for the access-token lifetime plus 2 minutes, so that tokens issued before the
#   erasure stay refused at every gateway; then pruned.
KEPT_POSTGRES = {'"auth"."revocations"'}
KEPT_REDIS = {"auth:revocations"}


@pytest.mark.timeout(900)
def test_export_then_erase_across_the_services(stack, gw, r, database_url, admin_headers, pii_view):
    """Issue 20: a user with an API key predicts (some cached), gives feedback, pushes a linked PII
    feature and runs a batch job; export, erase, use the credentials right after the erase; then
    Postgres, Redis, job storage, /metrics and logs hold nothing of the subject."""
    entity, view = pii_view
    email, password = f"subject-{secrets.token_hex(4)}@example.test", "subject-password-1"
    created = gw.post("/admin/users", json={"email": email, "password": password, "role": "developer"},
                      headers=admin_headers)
    assert created.status_code == 201, created.text
    uid = created.json()["id"]
    key = gw.post("/admin/api-keys", json={"name": "subject-key", "role": "developer", "owner_id": uid},
                  headers=admin_headers)
    assert key.status_code == 201, key.text
    key_id, api_key = key.json()["id"], {"X-API-Key": key.json()["key"]}
    assert key.json()["owner_id"] == uid
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

    # Predictions (one cached) by token and by key, and feedback.
    row = distinct_row()
    first = gw.post("/v1/predict/fraud", json={"inputs": row}, headers=user)
    assert first.status_code == 200, first.text
    pid = first.json()["prediction_id"]
    assert gw.post("/v1/predict/fraud", json={"inputs": row}, headers=user).json()["cached"] is True
    fb = gw.post("/v1/feedback", json={"prediction_id": pid, "label": 1}, headers=user)
    assert fb.status_code == 202, fb.text
    key_row = distinct_row()
    by_key = gw.post("/v1/predict/fraud", json={"inputs": key_row}, headers=api_key)
    assert by_key.status_code == 200, by_key.text

    # A small batch job with a distinctive input value.
    job_row = distinct_row()
    header = ",".join(job_row)
    job = gw.post("/v1/jobs/batch-inference", headers=user, data={"model": "fraud"},
                  files={"file": ("in.csv", f"{header}\n{','.join(str(v) for v in job_row.values())}\n", "text/csv")})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    poll(lambda: gw.get(f"/v1/jobs/{job_id}", headers=user).json()["status"] in ("succeeded", "failed") or None,
         "the batch job to finish")

    def exported():
        doc = gw.get("/v1/me/export", headers=user)
        assert doc.status_code == 200, doc.text
        doc = doc.json()
        persisted = any(p["prediction_id"] == pid for p in doc["predictions"]) and \
            any(f["prediction_id"] == pid for f in doc["feedback"]) and \
            any(p["principal"] == f"apikey:{key_id}" for p in doc["predictions"])
        return doc if persisted else None

    doc = poll(exported, "the pipeline to persist the prediction log (PIPELINE_PERSIST_EVERY_S)")
    assert doc["account"]["email"] == email and doc["account"]["id"] == uid
    assert doc["linked_entities"] == [{"entity": entity, "entity_id": person}]
    assert {p["principal"] for p in doc["predictions"]} == {uid, f"apikey:{key_id}"}
    assert {p["prediction_id"] for p in doc["prediction_log"]} >= {pid}
    [features] = doc["features"]
    assert [o["values"]["national_id"] for o in features["offline"]] == [secret_value]
    assert [o["values"]["national_id"] for o in features["online"]] == [secret_value]
    assert "key_hash" not in json.dumps(doc) and "password_hash" not in json.dumps(doc)
    [job_doc] = [j for j in doc["jobs"] if j["id"] == job_id]
    assert str(job_row["amount"]) in json.dumps(job_doc)  # the job's input rows are in the export
    input_hash = next(p["input_hash"] for p in doc["predictions"] if p["prediction_id"] == pid)
    cache_key = f"orchestrator:cache:fraud:{input_hash}"
    assert r.exists(cache_key) and r.exists(f"orchestrator:prediction:{pid}")

    # Erase; the credentials used in the moment after it are refused and write nothing.
    erased = gw.delete("/v1/me", headers=user)
    assert erased.status_code == 200, erased.text
    late_row = distinct_row()
    late = [gw.post("/v1/predict/fraud", json={"inputs": late_row}, headers=h) for h in (user, api_key)]
    assert [x.status_code for x in late] == [401, 401], [x.text for x in late]
    assert gw.post("/v1/features/push", headers=api_key, json={"view": view, "rows": []}).status_code == 401
    result = erased.json()
    assert result["state"] == "done", result
    assert set(result["confirmed"]) == {"pipeline", "orchestrator", "features", "auth"}
    counts = result["counts"]
    assert counts["pipeline"]["predictions"] >= 3 and counts["pipeline"]["feedback"] >= 1
    assert counts["orchestrator"]["cached_responses"] >= 1 and counts["features"]["offline_rows"] == 1
    assert counts["auth"]["users"] == 1 and counts["auth"]["api_keys"] == 1
    assert not r.exists(cache_key) and not r.exists(f"orchestrator:prediction:{pid}")
    assert not r.exists(f"features:online:{view}:{person}")
    assert login(stack.url("gateway"), email, password).status_code == 401
    assert gw.get("/v1/me/export", headers=user).status_code == 401  # the account is gone

    # Idempotent: the admin erase of the same id finds nothing left and still answers 200.
    again = gw.delete(f"/admin/users/{uid}/data", headers=admin_headers)
    assert again.status_code == 200, again.text
    assert again.json()["counts"]["pipeline"].get("predictions", 0) == 0
    assert again.json()["counts"]["auth"]["users"] == 0

    # The audit record: counts, confirmations and a keyed hash; no e-mail and no id in clear.
    audit = gw.get("/admin/audit", params={"action": "subject.erase"}, headers=admin_headers)
    assert audit.status_code == 200, audit.text
    [record] = [e for e in audit.json()["entries"] if e["details"]["erasure_id"] == result["erasure_id"]]
    text = json.dumps(record)
    assert email not in text and uid not in text and person not in text and key_id not in text
    assert record["details"]["requested_by"] == "subject" and record["details"]["counts"]["auth"]["users"] == 1
    assert set(record["details"]["confirmed"]) == {"pipeline", "orchestrator", "features", "auth"}
    everything = json.dumps(gw.get("/admin/audit", params={"limit": 1000}, headers=admin_headers).json())
    assert uid not in everything and email not in everything  # earlier entries about the user pseudonymised

    # Nothing of the subject anywhere (beyond what docs/privacy.md lists as kept).
    needles = [email, uid, key_id, person, secret_value, pid, job_id,
               *(str(x["amount"]) for x in (row, key_row, job_row, late_row))]
    assert [f for f in search_postgres(database_url, needles) if f[0] not in KEPT_POSTGRES] == []
    # Batch job tasks keep no Celery result (celery-task-meta-*) naming the job.
    assert [f for f in search_redis(r, needles) if f[0] not in KEPT_REDIS] == []
    assert search_files(stack.data_dir / "pipeline", needles) == []
    operator = {"X-Internal-Token": next(p.env for p in stack.procs if p.name == "gateway")["INTERNAL_TOKEN"]}
    for service in ("gateway", "auth", "orchestrator", "features", "model"):
        metrics = httpx.get(f"{stack.url(service)}/metrics", headers=operator, timeout=30).text
        assert not [n for n in needles if n in metrics], service
    logs_left = [(path.name, n) for path in (stack.data_dir / "logs").glob("*.log")
                 for n in needles if n in path.read_text(errors="replace")]
    # The worker's Celery task lines (received/succeeded) too: their arguments and results are hidden.
    assert logs_left == []


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
