"""The admin API through the gateway against the running stack: the overview, the pipeline's routes
(jobs, quality) behind the gateway, and the admin page's files."""
from __future__ import annotations

import csv
import io
import secrets

import httpx
import pytest

from services.demo import synthetic
from tests.conftest import poll
from tests.e2e.conftest import login

pytestmark = pytest.mark.e2e


def fraud_csv(n: int, seed: int) -> bytes:
    x, _ = synthetic.transactions(n=n, seed=seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(synthetic.FRAUD_FEATURES)
    w.writerows([[f"{v:.4f}" for v in row] for row in x])
    return buf.getvalue().encode()


def row(i: int) -> dict:
    return {"amount": 10.0 + i, "txn_count_24h": 3, "txn_amount_24h": 120.0, "avg_amount_30d": 35.0,
            "account_age_days": 400, "chargebacks_90d": 0, "distinct_merchants_7d": 2}




def test_overview_needs_the_admin_scope(stack, admin_headers):
    gw = stack.url("gateway")
    assert httpx.get(f"{gw}/admin/overview", timeout=30).status_code == 401
    email, password = f"viewer-{secrets.token_hex(4)}@example.test", secrets.token_urlsafe(12)
    r = httpx.post(f"{gw}/admin/users", json={"email": email, "password": password, "role": "developer"},
                   headers=admin_headers, timeout=30)
    assert r.status_code == 201, r.text
    token = login(gw, email, password).json()["access_token"]
    r = httpx.get(f"{gw}/admin/overview", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"


def test_overview_shows_services_models_traffic_and_jobs(stack, admin_headers):
    gw = stack.url("gateway")
    with httpx.Client(base_url=gw, headers=admin_headers, timeout=60) as c:
        # The overview is as fresh as its last scrape (every 5 s): a replica that was still starting
        # when the gateway scraped shows up on the next one. Poll for that, then judge.
        def settled():
            d = c.get("/admin/overview").json()
            ok = all(s["status"] == "ready" and all(r["version"] for r in s["replicas"]) for s in d["services"])
            return d if ok else None

        doc = poll(settled, "every service ready with its version in the overview")
        services = {s["name"]: s for s in doc["services"]}
        assert set(services) == {"gateway", "auth", "orchestrator", "model", "features", "pipeline"}
        for name, svc in services.items():
            assert all(r["version"] for r in svc["replicas"]), (name, svc)
        models = {m["name"]: m for m in doc["models"]}
        assert {"1", "2"} <= {v["version"] for v in models["fraud"]["versions"]}
        assert "routes" in models["fraud"]["policy"]

        # Traffic: predictions (the same row twice: the second one is a cache hit).
        for i in range(10):
            for _ in range(2):
                assert c.post("/v1/predict/fraud", json={"inputs": row(i)}).status_code == 200

        def traffic():
            d = c.get("/admin/overview").json()
            s, fraud = d["traffic"]["summary"], next(m for m in d["models"] if m["name"] == "fraud")
            return d if s["rps"] and s["p95_ms"] and s["cache_hit_ratio"] and fraud["predictions_per_s"] else None

        doc = poll(traffic, "the predictions in the overview")
        summary = doc["traffic"]["summary"]
        assert summary["p50_ms"] <= summary["p95_ms"] and 0 < summary["cache_hit_ratio"] <= 1
        assert summary["error_rate"] is not None and summary["error_rate"] < 1
        assert doc["traffic"]["series"] and {"t", "rps", "p50_ms", "p95_ms", "cache_hit_ratio"} <= set(
            doc["traffic"]["series"][-1])

        # A running job shows up with its progress.
        r = c.post("/v1/jobs/batch-inference", files={"file": ("rows.csv", fraud_csv(3000, 11), "text/csv")},
                   data={"model": "fraud", "chunk_rows": "500"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        seen = poll(lambda: next((j for j in c.get("/admin/overview").json()["jobs"] if j["id"] == job_id), None),
                    "the job in the overview")
        assert "fraction" in seen["progress"]


def test_jobs_and_quality_route_to_the_pipeline(stack, admin_headers):
    with httpx.Client(base_url=stack.url("gateway"), headers=admin_headers, timeout=60) as c:
        r = c.post("/v1/jobs/batch-inference", files={"file": ("rows.csv", fraud_csv(1200, 5), "text/csv")},
                   data={"model": "fraud", "version": "1", "chunk_rows": "400"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = poll(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
                   "the job to finish")
        assert job["status"] == "succeeded" and job["progress"]["fraction"] == 1.0
        assert job["progress"]["done_rows"] == 1200 and job["version"] == "1"
        assert any(j["id"] == job_id for j in c.get("/v1/jobs").json()["jobs"])
        result = c.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 200 and len(result.text.strip().splitlines()) == 1201
        assert c.get("/admin/models/fraud/quality").status_code == 200
        assert c.get("/admin/models/fraud/drift").status_code == 200
        assert c.get("/admin/models/fraud/training").status_code == 200


def test_the_admin_page_is_served_with_its_assets(stack):
    gw = stack.url("gateway")
    r = httpx.get(f"{gw}/admin", follow_redirects=True, timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset in ("assets/app.css", "assets/js/app.js", "assets/js/api.js", "assets/js/chart.js"):
        a = httpx.get(f"{gw}/admin/{asset}", timeout=30)
        assert a.status_code == 200, asset
    assert "javascript" in httpx.get(f"{gw}/admin/assets/js/app.js", timeout=30).headers["content-type"]
    assert httpx.get(f"{gw}/admin/assets/missing.js", timeout=30).status_code == 404
