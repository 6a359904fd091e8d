"""Bounded metric labels across the stack (issue 19): traffic from many principals through the
gateway (API keys and signed-in users) adds no time series on any service, and no principal,
user id, key id or e-mail appears in any /metrics."""
from __future__ import annotations

import secrets

import httpx
import pytest

from tests.e2e.conftest import login

pytestmark = pytest.mark.e2e

SERVICES = ("gateway", "auth", "orchestrator", "model", "features", "pipeline")
# Series that come and go with the worker's own schedule, not with callers (task names are bounded
# by the code, but whether beat ran a task between two scrapes is a matter of time).
BACKGROUND = ("aistack_pipeline_tasks", "aistack_pipeline_task_duration", "aistack_pipeline_queue_depth")
ROW = {"amount": 77.125, "txn_count_24h": 5, "txn_amount_24h": 400.0, "avg_amount_30d": 40.0,
       "account_age_days": 30, "chargebacks_90d": 1, "distinct_merchants_7d": 6}


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#") and not line.startswith(BACKGROUND)}


def scrape(stack) -> dict[str, str]:
    return {name: httpx.get(f"{stack.url(name)}/metrics", timeout=30).text for name in SERVICES}


def principals(stack, admin_headers, keys: int, users: int) -> list[tuple[dict, list[str]]]:
    """(headers, identifiers) per principal: API keys and users with a signed-in access token."""
    gw = stack.url("gateway")
    out = []
    for _ in range(keys):
        r = httpx.post(f"{gw}/admin/api-keys", json={"name": f"card-{secrets.token_hex(3)}", "role": "service",
                                                     "scopes": ["predict"]}, headers=admin_headers, timeout=30)
        assert r.status_code in (200, 201), r.text
        out.append(({"X-API-Key": r.json()["key"]}, [r.json()["id"], f"apikey:{r.json()['id']}"]))
    for _ in range(users):
        email, password = f"card-{secrets.token_hex(4)}@example.test", secrets.token_urlsafe(18)
        r = httpx.post(f"{gw}/admin/users", json={"email": email, "password": password, "role": "developer"},
                       headers=admin_headers, timeout=30)
        assert r.status_code == 201, r.text
        token = login(gw, email, password).json()["access_token"]
        out.append(({"Authorization": f"Bearer {token}"}, [r.json()["id"], email]))
    return out


def traffic(stack, headers: dict) -> None:
    """What a caller does on the prediction path: a shared input (cache miss, then hits), an input
    of its own, feedback on it, and a feedback id that does not exist."""
    gw = stack.url("gateway")
    with httpx.Client(base_url=gw, headers=headers, timeout=60) as c:
        for _ in range(2):
            assert c.post("/v1/predict/fraud", json={"inputs": ROW}).status_code == 200
        own = c.post("/v1/predict/fraud", json={"inputs": {**ROW, "amount": 1 + secrets.randbelow(10**6) / 7}})
        assert own.status_code == 200, own.text
        assert c.post("/v1/feedback", json={"prediction_id": own.json()["prediction_id"], "label": 1}).status_code == 202
        assert c.post("/v1/feedback", json={"prediction_id": "no-such-id", "label": 1}).status_code == 404


@pytest.mark.timeout(900)
def test_series_do_not_grow_with_principals(stack, admin_headers):
    warm = principals(stack, admin_headers, keys=1, users=1)
    many = principals(stack, admin_headers, keys=10, users=4)
    for headers, _ in warm * 2:  # twice: every cache result and status this traffic produces is seen
        traffic(stack, headers)
    before = {name: series(text) for name, text in scrape(stack).items()}
    for headers, _ in many:
        traffic(stack, headers)
    after = scrape(stack)
    grown = {name: sorted(series(text) - before[name]) for name, text in after.items()}
    assert grown == {name: [] for name in SERVICES}
    leaked = [(name, ident) for name, text in after.items() for _, ids in warm + many for ident in ids
              if ident in text]
    assert leaked == []
