"""`aistack login` and `aistack admin ...` against the running stack: JSON output and exit codes."""
from __future__ import annotations

import json
import secrets

import httpx
import pytest
import typer
from typer.testing import CliRunner

from services.cli.admin import register, token_file
from tests.e2e.test_admin_api import fraud_csv

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture()
def run(cli, stack, admin_tokens, tmp_path, monkeypatch):
    """Invoke the CLI as a logged-in admin (AISTACK_TOKEN), with its own config dir."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("AISTACK_URL", stack.url("gateway"))
    monkeypatch.setenv("AISTACK_TOKEN", admin_tokens["access_token"])
    runner = CliRunner()

    def invoke(*args: str, code: int | None = 0, env: dict | None = None):
        result = runner.invoke(cli, list(args), env=env)
        if code is not None:
            assert result.exit_code == code, (args, result.exit_code, result.output, result.exception)
        return result

    return invoke


def as_json(result):
    return json.loads(result.stdout)


def test_login_stores_a_token_that_later_commands_use(run, stack, monkeypatch):
    monkeypatch.delenv("AISTACK_TOKEN")
    run("admin", "overview", code=1)  # not logged in: the gateway says 401
    run("login", "--email", stack.admin_email, "--password", "wrong-password", code=1)
    out = as_json(run("login", "--email", stack.admin_email, "--password", stack.admin_password, "--json"))
    assert "admin" in out["scope"].split()
    path = token_file()
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    doc = as_json(run("admin", "overview", "--json"))
    assert {s["name"] for s in doc["services"]} >= {"gateway", "orchestrator", "pipeline"}
    run("logout")
    assert not path.exists()


def test_exit_codes(run, monkeypatch):
    run("admin", "policy", "set", "fraud", code=2)  # none of --route/--canary/--switch: usage
    run("admin", "policy", "set", "fraud", "--route", "one", code=2)
    run("admin", "nonsense", code=2)
    run("admin", "jobs", "status", "no-such-job", code=1)  # 404
    run("admin", "overview", "--url", "http://127.0.0.1:9", code=3)  # nothing listens
    monkeypatch.setenv("AISTACK_TOKEN", "not-a-token")
    run("admin", "overview", code=1)  # 401


def test_models_and_policy_set_show_rollback(run, stack, admin_headers):
    gw = stack.url("gateway")
    original = httpx.get(f"{gw}/admin/models/fraud/policy", headers=admin_headers, timeout=30).json()["policy"]
    try:
        models = as_json(run("admin", "models", "list", "--json"))
        fraud = next(m for m in models if m["name"] == "fraud")
        assert {"1", "2"} <= {v["version"] for v in fraud["versions"]}
        out = as_json(run("admin", "policy", "set", "fraud", "-r", "1=70,2=30", "--reason", "cli test", "--json"))
        assert out["policy"]["routes"] == {"1": 70.0, "2": 30.0} and out["reason"] == "cli test"
        assert out["policy"]["cache_ttl_s"] == original["cache_ttl_s"]  # the rest of the policy stays
        out = as_json(run("admin", "policy", "set", "fraud", "--canary", "2", "--percent", "10", "--stable", "1",
                          "--json"))
        assert out["policy"]["routes"] == {"1": 90.0, "2": 10.0}
        out = as_json(run("admin", "policy", "set", "fraud", "--switch", "2", "--json"))
        assert out["policy"]["routes"] == {"2": 100.0}
        assert as_json(run("admin", "policy", "show", "fraud", "--json"))["policy"]["routes"] == {"2": 100.0}
        out = as_json(run("admin", "policy", "rollback", "fraud", "--json"))
        assert out["policy"]["routes"] == {"1": 90.0, "2": 10.0}
        history = as_json(run("admin", "policy", "history", "fraud", "--json"))
        assert history[0]["id"] == out["id"]
        run("admin", "policy", "set", "fraud", "--switch", "9", code=1)  # unknown version: 422
        assert "fraud" in run("admin", "models", "list", env={"COLUMNS": "200"}).stdout  # the table renders
    finally:
        httpx.put(f"{gw}/admin/models/fraud/policy", json={"policy": original, "reason": "restore after cli test"},
                  headers=admin_headers, timeout=30)


def test_jobs_submit_wait_list_status_download_cancel(run, tmp_path):
    data = tmp_path / "rows.csv"
    data.write_bytes(fraud_csv(1500, 21))
    job = as_json(run("admin", "jobs", "submit", str(data), "--model", "fraud", "--chunk-rows", "500", "--wait",
                      "--json"))
    assert job["status"] == "succeeded" and job["progress"]["done_rows"] == 1500
    assert any(j["id"] == job["id"] for j in as_json(run("admin", "jobs", "list", "--json")))
    assert as_json(run("admin", "jobs", "status", job["id"], "--json"))["status"] == "succeeded"
    target = tmp_path / "out.csv"
    out = as_json(run("admin", "jobs", "download", job["id"], "-o", str(target), "--json"))
    assert out["bytes"] == target.stat().st_size and len(target.read_text().strip().splitlines()) == 1501
    run("admin", "jobs", "cancel", job["id"], code=1)  # finished: 409

    # A cancelled job ends `status --wait` with exit code 1 (if it finished first, cancel says 409).
    big = tmp_path / "big.csv"
    big.write_bytes(fraud_csv(8000, 22))  # under the gateway's 1 MiB body limit
    queued = as_json(run("admin", "jobs", "submit", str(big), "--model", "fraud", "--chunk-rows", "200", "--json"))
    cancel = run("admin", "jobs", "cancel", queued["id"], "--json", code=None)
    if cancel.exit_code == 0:
        assert as_json(cancel)["status"] == "cancelled"
        run("admin", "jobs", "status", queued["id"], "--wait", "--json", code=1)
    else:
        assert cancel.exit_code == 1
    assert "succeeded" in run("admin", "jobs", "list", env={"COLUMNS": "200"}).stdout  # the table renders


def test_keys_and_users(run, stack):
    name = f"cli-{secrets.token_hex(4)}"
    key = as_json(run("admin", "keys", "create", name, "--role", "service", "--scope", "predict", "--json"))
    assert key["key"].startswith("ak_") and key["scopes"] == ["predict"]
    assert any(k["name"] == name for k in as_json(run("admin", "keys", "list", "--json")))
    gw = stack.url("gateway")
    predict = {"inputs": {"amount": 1.0, "txn_count_24h": 1, "txn_amount_24h": 1.0, "avg_amount_30d": 1.0,
                          "account_age_days": 1, "chargebacks_90d": 0, "distinct_merchants_7d": 1}}
    assert httpx.post(f"{gw}/v1/predict/fraud", json=predict, headers={"X-API-Key": key["key"]},
                      timeout=30).status_code == 200
    revoked = as_json(run("admin", "keys", "revoke", name, "--json"))
    assert revoked["revoked_at"]
    assert not any(k["name"] == name for k in as_json(run("admin", "keys", "list", "--json")))
    run("admin", "keys", "revoke", name, code=1)  # no active key of that name

    email = f"cli-{secrets.token_hex(4)}@example.test"
    user = as_json(run("admin", "users", "create", email, "--role", "developer", "--json"))
    assert user["role"] == "developer" and user["password"]
    assert any(u["email"] == email for u in as_json(run("admin", "users", "list", "--json")))
    assert as_json(run("admin", "users", "disable", email, "--json"))["disabled"] is True
    r = httpx.post(f"{gw}/v1/auth/token", data={"username": email, "password": user["password"]}, timeout=30)
    assert r.status_code in (401, 403)
    run("admin", "users", "create", email, code=1)  # exists already: 409
