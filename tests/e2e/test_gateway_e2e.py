"""Gateway and auth as real processes: the login flow, refresh reuse, a rate limit shared by two
gateway replicas, API key revocation, and an orchestrator replica killed under traffic."""
from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest

from tests.e2e.conftest import login

pytestmark = pytest.mark.e2e

# Inputs of our own: the orchestrator's cache is shared, and test_stack expects its ROW uncached.
ROW = {"amount": 123.25, "txn_count_24h": 5, "txn_amount_24h": 400.0, "avg_amount_30d": 40.0,
       "account_age_days": 30, "chargebacks_90d": 1, "distinct_merchants_7d": 6}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def new_user(stack, admin_headers, role: str) -> tuple[str, str]:
    email, password = f"e2e-{secrets.token_hex(4)}@example.test", secrets.token_urlsafe(12)
    r = httpx.post(f"{stack.url('gateway')}/admin/users", json={"email": email, "password": password, "role": role},
                   headers=admin_headers, timeout=30)
    assert r.status_code == 201, r.text
    return email, password


def test_login_call_refresh_logout(stack):
    gw = stack.url("gateway")
    tokens = login(gw, stack.admin_email, stack.admin_password).json()
    with httpx.Client(base_url=gw, timeout=30) as c:
        assert c.post("/v1/predict/fraud", json={"inputs": ROW}).status_code == 401
        r = c.post("/v1/predict/fraud", json={"inputs": ROW}, headers=bearer(tokens["access_token"]))
        assert r.status_code == 200, r.text
        me = c.get("/v1/auth/me", headers=bearer(tokens["access_token"])).json()
        assert me["email"] == stack.admin_email and me["role"] == "admin"
        refreshed = c.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert refreshed.status_code == 200, refreshed.text
        fresh = refreshed.json()
        assert c.post("/v1/predict/fraud", json={"inputs": ROW},
                      headers=bearer(fresh["access_token"])).status_code == 200
        assert c.post("/v1/auth/logout", json={"refresh_token": fresh["refresh_token"]}).status_code == 204
        assert c.post("/v1/auth/refresh", json={"refresh_token": fresh["refresh_token"]}).status_code == 401


def test_refresh_token_reuse_revokes_the_family(stack):
    gw = stack.url("gateway")
    first = login(gw, stack.admin_email, stack.admin_password).json()
    with httpx.Client(base_url=gw, timeout=30) as c:
        second = c.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}).json()
        reuse = c.post("/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
        assert reuse.status_code == 401 and reuse.json()["error"]["code"] == "refresh_token_reused"
        assert c.post("/v1/auth/refresh", json={"refresh_token": second["refresh_token"]}).status_code == 401


@pytest.mark.parametrize("token", ["", "Bearer not.a.jwt", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."])
def test_bad_credentials_are_401(stack, token):
    r = httpx.post(f"{stack.url('gateway')}/v1/predict/fraud", json={"inputs": ROW},
                   headers={"Authorization": token} if token else {}, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


@pytest.fixture(scope="module")
def two_gateways(stack, replicas):
    """Two more gateway processes with a small developer limit and a 1 s API-key cache."""
    env = {"GATEWAY_RATE_LIMIT_RPM": json.dumps({"developer": 5, "service": 6}),
           "GATEWAY_API_KEY_CACHE_TTL_S": "1"}
    return [replicas.start("gateway", env)[0] for _ in range(2)]


def test_rate_limit_is_global_across_two_gateway_replicas(stack, admin_headers, two_gateways):
    email, password = new_user(stack, admin_headers, "developer")
    headers = bearer(login(stack.url("gateway"), email, password).json()["access_token"])
    start = time.monotonic()
    results = []
    for i in range(12):
        r = httpx.post(f"{two_gateways[i % 2]}/v1/predict/fraud", json={"inputs": ROW}, headers=headers, timeout=30)
        results.append(r)
    elapsed = time.monotonic() - start
    ok = [r for r in results if r.status_code == 200]
    limited = [r for r in results if r.status_code == 429]
    assert len(ok) + len(limited) == len(results)
    # One bucket of 5 per minute for both replicas together (plus what refilled meanwhile).
    assert 5 <= len(ok) <= 5 + int(elapsed * 5 / 60) + 1
    assert {r.request.url.host + str(r.request.url.port) for r in ok} != set() and limited
    first = ok[0]
    assert first.headers["ratelimit-limit"] == "5" and "w=60" in first.headers["ratelimit-policy"]
    last = limited[-1]
    assert last.headers["ratelimit-remaining"] == "0" and int(last.headers["retry-after"]) >= 1
    assert last.json()["error"]["code"] == "rate_limited"
    # Both replicas answered 429 at some point: the limit is not per replica.
    assert {str(r.request.url.port) for r in limited} == {two_gateways[0].rsplit(":", 1)[1],
                                                          two_gateways[1].rsplit(":", 1)[1]}


def test_api_key_revocation_reaches_the_gateways_within_the_cache_ttl(stack, admin_headers, two_gateways):
    gw = stack.url("gateway")
    created = httpx.post(f"{gw}/admin/api-keys", json={"name": "e2e", "role": "service", "scopes": ["predict"]},
                         headers=admin_headers, timeout=30).json()
    key = {"X-API-Key": created["key"]}
    r = httpx.post(f"{two_gateways[0]}/v1/predict/fraud", json={"inputs": ROW}, headers=key, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.delete(f"{gw}/admin/api-keys/{created['id']}", headers=admin_headers, timeout=30).status_code == 200
    deadline = time.monotonic() + 60
    while httpx.post(f"{two_gateways[0]}/v1/predict/fraud", json={"inputs": ROW}, headers=key,
                     timeout=30).status_code == 200:
        assert time.monotonic() < deadline, "revocation never reached the gateway"
        time.sleep(0.2)
    r = httpx.post(f"{two_gateways[1]}/v1/predict/fraud", json={"inputs": ROW}, headers=key, timeout=30)
    assert r.status_code == 401


def test_requests_keep_succeeding_when_an_orchestrator_replica_is_killed(stack, admin_headers, replicas):
    (url_a, proc_a), (url_b, _) = replicas.start("orchestrator", {}), replicas.start("orchestrator", {})
    gateway, _ = replicas.start("gateway", {"GATEWAY_ORCHESTRATOR_URLS": f"{url_a},{url_b}"})
    statuses = []
    with httpx.Client(base_url=gateway, headers=admin_headers, timeout=30) as c:
        for i in range(40):
            if i == 15:
                replicas.kill(proc_a)  # SIGKILL, no goodbye
            r = c.post("/v1/predict/fraud", json={"inputs": {**ROW, "amount": float(i)}})
            statuses.append((i, r.status_code, r.text[:200]))
        metrics = c.get("/metrics").text
    assert all(status == 200 for _, status, _ in statuses), [s for s in statuses if s[1] != 200]
    assert "aistack_upstream_ejections_total" in metrics
