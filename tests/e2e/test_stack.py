"""The whole stack as separate processes over real HTTP: gateway -> orchestrator -> model."""
from __future__ import annotations

import httpx
import pytest

from services.demo import synthetic

pytestmark = pytest.mark.e2e

ROW = {"amount": 250.0, "txn_count_24h": 5, "txn_amount_24h": 400.0, "avg_amount_30d": 40.0,
       "account_age_days": 30, "chargebacks_90d": 1, "distinct_merchants_7d": 6}


@pytest.fixture(scope="module")
def gateway(stack, admin_headers):
    """Calls through the gateway carry the stack admin's access token (tests/e2e/conftest.py)."""
    with httpx.Client(base_url=stack.url("gateway"), timeout=30, headers=admin_headers) as c:
        yield c


def test_every_service_serves_health_ready_metrics_openapi(stack):
    # The gateway serves /metrics and /openapi.json to operators only (issue 13): the internal token.
    operator = {"X-Internal-Token": next(p.env for p in stack.procs if p.name == "gateway")["INTERNAL_TOKEN"]}
    for name in ("gateway", "auth", "orchestrator", "model", "features", "pipeline"):
        base = stack.url(name)
        assert httpx.get(f"{base}/health").json()["status"] == "ok", name
        ready = httpx.get(f"{base}/ready")
        assert ready.status_code == 200, (name, ready.text)
        assert "aistack_http_requests_total" in httpx.get(f"{base}/metrics", headers=operator).text or name == "pipeline"
        assert httpx.get(f"{base}/openapi.json", headers=operator).json()["info"]["title"].startswith("aistack"), name


def test_prediction_through_gateway_is_the_models_real_output(stack, gateway, models_dir):
    import joblib
    import numpy as np

    r = gateway.post("/v1/predict/fraud", json={"inputs": ROW})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fraud" and body["cached"] is False and body["prediction_id"]
    # The same answer straight from the trained artifact, no server in between.
    est = joblib.load(models_dir / "fraud" / body["version"] / "model.joblib")
    x = np.array([[ROW[f] for f in synthetic.FRAUD_FEATURES]], dtype=np.float32)
    expected = est.predict_proba(x)[0]
    assert body["outputs"]["probability"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert body["outputs"]["label"] == int(expected.argmax())


def test_batch_prediction_and_pinned_version(gateway):
    rows = [ROW, {**ROW, "chargebacks_90d": 0, "amount": 5.0}]
    r = gateway.post("/v1/predict/fraud", json={"instances": rows, "version": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == "1" and len(body["predictions"]) == 2


@pytest.mark.parametrize("content, status, code", [
    (b'{"inputs": ', 400, "malformed_json"),
    (b'{}', 422, "validation_error"),
    (b'{"inputs": {"amount": 1}}', 422, "missing_features"),
    (b'{"inputs": {"amount": "a lot"}}', 422, None),
])
def test_bad_input_is_a_4xx_in_the_error_shape(gateway, content, status, code):
    r = gateway.post("/v1/predict/fraud", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code


def test_unknown_model_is_404(gateway):
    r = gateway.post("/v1/predict/nope", json={"inputs": ROW})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_wrong_shaped_v2_request_is_400_in_the_protocols_shape(stack):
    bad = {"inputs": [{"name": "amount", "shape": [2], "datatype": "FP32", "data": [1.0]}]}
    r = httpx.post(f"{stack.url('model')}/v2/models/fraud/infer", json=bad)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(f"{stack.url('model')}/v2/models/fraud/infer", content=b"[not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_celery_task_round_trips_through_a_worker(stack):
    """A real task on the Redis broker, run by the stack's worker process, scoring on the model server."""
    from services.pipeline.celery_app import create_celery
    from services.pipeline.settings import PipelineSettings

    celery = create_celery(PipelineSettings(redis_url=stack.redis_url))
    try:
        result = celery.send_task("pipeline.score_rows", args=["fraud", [ROW]], kwargs={"version": "2"})
        out = result.get(timeout=60)
    finally:
        celery.close()
    assert out["version"] == "2" and out["outputs"][0]["label"] in (0, 1)
    assert sum(out["outputs"][0]["probability"]) == pytest.approx(1.0, rel=1e-5)
