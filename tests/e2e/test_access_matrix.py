"""Issue 13's access-control matrix, through the gateway of the running stack: every public route
with anonymous, viewer, developer, service key, a disabled user's key and admin, plus another
caller's object ids (another's job or prediction answers 404, never 403)."""
from __future__ import annotations

import secrets
import time

import httpx
import pytest

from services.demo import synthetic
from tests.e2e.conftest import login

pytestmark = pytest.mark.e2e

STRONG = "matrix-passphrase-4471"
ROW = {"amount": 42.5, "txn_count_24h": 3, "txn_amount_24h": 120.0, "avg_amount_30d": 35.0,
       "account_age_days": 400, "chargebacks_90d": 0, "distinct_merchants_7d": 2}
CALLERS = ("anonymous", "viewer", "developer", "service_key", "disabled_key", "admin")


def _user(gw: httpx.Client, admin: dict, role: str) -> tuple[str, dict]:
    uid, headers, _ = _user_email(gw, admin, role)
    return uid, headers


def _user_email(gw: httpx.Client, admin: dict, role: str) -> tuple[str, dict, str]:
    email = f"m-{role}-{secrets.token_hex(4)}@example.test"
    r = gw.post("/admin/users", json={"email": email, "password": STRONG, "role": role}, headers=admin)
    assert r.status_code == 201, r.text
    tokens = login(str(gw.base_url).rstrip("/"), email, STRONG)
    assert tokens.status_code == 200, tokens.text
    return r.json()["id"], {"Authorization": f"Bearer {tokens.json()['access_token']}"}, email


@pytest.fixture(scope="module")
def gw(stack):
    with httpx.Client(base_url=stack.url("gateway"), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def callers(gw, admin_headers) -> dict[str, dict]:
    out = {"anonymous": {}, "admin": admin_headers}
    _, out["viewer"] = _user(gw, admin_headers, "viewer")
    _, out["developer"] = _user(gw, admin_headers, "developer")
    svc = gw.post("/admin/api-keys", json={"name": "matrix-service", "role": "service"}, headers=admin_headers)
    assert svc.status_code == 201, svc.text
    out["service_key"] = {"X-API-Key": svc.json()["key"]}
    # A developer with a key, then disabled: the key must die with the account.
    uid, owner, _ = _user_email(gw, admin_headers, "admin")
    key = gw.post("/admin/api-keys", json={"name": "doomed", "role": "service"}, headers=owner)
    assert key.status_code == 201, key.text
    out["disabled_key"] = {"X-API-Key": key.json()["key"]}
    assert gw.post("/v1/predict/fraud", json={"inputs": ROW}, headers=out["disabled_key"]).status_code == 200
    assert gw.post(f"/admin/users/{uid}/disable", headers=admin_headers).status_code == 200
    return out


A, V, D, S, X, M = CALLERS  # anonymous, viewer, developer, service key, disabled key, admin
ADMIN_ONLY = {A: 401, V: 403, D: 403, S: 403, X: 401, M: 200}
# (method, path, body, expected status per caller)
MATRIX = [
    ("POST", "/v1/predict/fraud", {"inputs": ROW}, {A: 401, V: 403, D: 200, S: 200, X: 401, M: 200}),
    ("POST", "/v1/features/online", {"entity": "customer", "ids": ["C0001"], "features": ["customer_transactions"]},
     {A: 401, V: 200, D: 200, S: 200, X: 401, M: 200}),
    ("POST", "/v1/features/push", {"view": "no_such_view_matrix", "rows": [{"customer_id": "C0001"}]},
     {A: 401, V: 403, D: 404, S: 404, X: 401, M: 404}),
    ("POST", "/v1/feedback", {"prediction_id": "no-such-prediction", "label": 1},
     {A: 401, V: 403, D: 404, S: 404, X: 401, M: 404}),
    ("POST", "/admin/api-keys", {"name": "matrix", "role": "viewer"}, {A: 401, V: 403, D: 403, S: 403, X: 401, M: 201}),
    ("GET", "/v1/jobs", None, {A: 401, V: 403, D: 200, S: 403, X: 401, M: 200}),
    ("GET", "/v1/auth/me", None, {A: 401, V: 200, D: 200, S: 400, X: 401, M: 200}),
    ("GET", "/v1/me/export", None, {A: 401, V: 200, D: 200, S: 200, X: 401, M: 200}),
    ("POST", "/v1/auth/logout-all", None, {A: 401, V: None, D: None, S: 403, X: 401, M: None}),
    ("GET", "/admin/users", None, ADMIN_ONLY),
    ("GET", "/admin/api-keys", None, ADMIN_ONLY),
    ("GET", "/admin/audit", None, ADMIN_ONLY),
    ("GET", "/admin/models/fraud/policy", None, ADMIN_ONLY),
    ("GET", "/admin/overview", None, ADMIN_ONLY),
    ("GET", "/admin/models/fraud/quality", None, ADMIN_ONLY),
    ("GET", "/metrics", None, ADMIN_ONLY),
    ("GET", "/openapi.json", None, ADMIN_ONLY),
    ("GET", "/.well-known/jwks.json", None, {c: 200 for c in CALLERS}),
]


def test_every_route_answers_each_caller_as_expected(gw, callers):
    wrong = []
    for method, path, body, expected in MATRIX:
        for caller, status in expected.items():
            if status is None:  # signing out everywhere would end the module's own sessions
                continue
            r = gw.request(method, path, json=body, headers=callers[caller])
            if r.status_code != status:
                wrong.append((method, path, caller, status, r.status_code, r.text[:160]))
            if r.status_code in (401, 403):
                assert r.json()["error"]["code"], (path, caller)
    assert not wrong, "\n".join(map(str, wrong))


def test_a_key_export_is_its_own_principal_only(gw, callers, admin_headers):
    doc = gw.get("/v1/me/export", headers=callers["service_key"]).json()
    assert len(doc["principals"]) == 1 and doc["principals"][0].startswith("apikey:")
    assert "account" not in doc and "api_keys" not in doc  # not the admin who created it


def _csv() -> bytes:
    cols = list(synthetic.FRAUD_FEATURES)
    return (",".join(cols) + "\n" + ",".join(str(ROW.get(c, 1.0)) for c in cols) + "\n").encode()


@pytest.fixture(scope="module")
def alice_job(gw, admin_headers, callers) -> tuple[dict, dict, str]:
    """(alice's headers, bob's headers, alice's job id): two developers."""
    _, alice = _user(gw, admin_headers, "developer")
    _, bob = _user(gw, admin_headers, "developer")
    r = gw.post("/v1/jobs/batch-inference", files={"file": ("in.csv", _csv(), "text/csv")},
                data={"model": "fraud"}, headers=alice)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    deadline = time.monotonic() + 120
    while gw.get(f"/v1/jobs/{job}", headers=alice).json()["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    return alice, bob, job


def test_another_callers_job_answers_404_and_admin_sees_it(gw, alice_job, admin_headers):
    alice, bob, job = alice_job
    assert gw.get(f"/v1/jobs/{job}", headers=alice).status_code == 200
    for method, path in (("GET", f"/v1/jobs/{job}"), ("POST", f"/v1/jobs/{job}/cancel"),
                         ("GET", f"/v1/jobs/{job}/result")):
        r = gw.request(method, path, headers=bob)
        assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
    assert job not in gw.get("/v1/jobs", headers=bob).text
    assert gw.get(f"/v1/jobs/{job}", headers=admin_headers).status_code == 200


def test_another_callers_upload_cannot_be_named_as_input(gw, alice_job):
    _, bob, job = alice_job
    for path in (f"jobs/{job}/input.csv", f"jobs/{job}/upload.csv", f"uploads/{job}.csv"):
        r = gw.post("/v1/jobs/batch-inference", json={"path": path, "model": "fraud"}, headers=bob)
        assert r.status_code in (404, 422), (path, r.status_code, r.text[:200])


def test_feedback_on_another_callers_prediction_answers_404(gw, admin_headers):
    _, alice = _user(gw, admin_headers, "developer")
    _, bob = _user(gw, admin_headers, "developer")
    pid = gw.post("/v1/predict/fraud", json={"inputs": {**ROW, "amount": 77.7}}, headers=alice).json()["prediction_id"]
    r = gw.post("/v1/feedback", json={"prediction_id": pid, "label": 1}, headers=bob)
    assert r.status_code == 404 and r.json()["error"]["code"] == "prediction_not_found", r.text
    assert gw.post("/v1/feedback", json={"prediction_id": pid, "label": 1}, headers=alice).status_code == 202
