"""Input guards over real HTTP: the model server (uvicorn, real models), the orchestrator in front of
it (real Redis and Postgres), and the gateway's path handling (real auth, echo upstreams)."""
from __future__ import annotations

import json
from urllib.parse import unquote

import httpx
import pytest

from services.model.app import create_app as model_app
from services.model.settings import ModelSettings
from services.orchestrator.app import create_app as orchestrator_app
from services.orchestrator.settings import OrchestratorSettings
from tests.conftest import ServedApp, free_port
from tests.integration.test_auth_service import auth_db  # noqa: F401 (pytest fixture)
from tests.integration.test_gateway_http import (  # noqa: F401 (pytest fixtures)
    auth_server,
    bearer,
    gw,
    login,
    upstreams,
)

LIMIT = 256 * 1024
# Percent-encoded as a client sends them (a literal ".." would be resolved by the HTTP client itself).
BAD_NAMES = ["%2e%2e", "..%2Fetc", "%2e%2e%2f%2e%2e%2fetc", "x" * 300, "fr%00aud", "a%20b"]


@pytest.fixture(scope="module")
def model_server(models_dir):
    app = model_app(ModelSettings(repository=models_dir, ready_max_cpu_percent=100, max_body_bytes=LIMIT))
    with ServedApp(app) as served:
        yield served


@pytest.fixture(scope="module")
def edges(models_dir) -> dict:
    return json.loads((models_dir / "fraud" / "2" / "baseline.json").read_text())


def typical_row(edges) -> dict:
    return {f: e[5] for f, e in edges.items()}  # the training median of each feature


def v2_body(rows: list[dict]) -> dict:
    return {"inputs": [{"name": f, "datatype": "FP32", "shape": [len(rows)], "data": [r[f] for r in rows]}
                       for f in rows[0]]}


def ood_count(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('aistack_model_ood_rows_total{model="fraud",version="2"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- model server -------------------------------------------------------------------------------------
def test_model_server_flags_out_of_distribution_rows_and_counts_them(model_server, edges):
    typical = typical_row(edges)
    extreme = {**typical, "chargebacks_90d": edges["chargebacks_90d"][-1] + 30}
    before = ood_count(model_server.url)
    r = httpx.post(f"{model_server.url}/v2/models/fraud/versions/2/infer", json=v2_body([typical, extreme]))
    assert r.status_code == 200, r.text
    params = r.json()["parameters"]
    assert params["ood"] == [False, True] and params["ood_score"][0] == 0 and params["ood_score"][1] == 10
    assert ood_count(model_server.url) == before + 1


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_model_server_refuses_non_finite_numbers_with_400(model_server, edges, literal):
    body = json.dumps(v2_body([typical_row(edges)])).replace(f'"data": [{edges["amount"][5]}]', f'"data": [{literal}]')
    assert literal in body
    r = httpx.post(f"{model_server.url}/v2/models/fraud/versions/2/infer", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_model_server_body_limit_answers_413_in_the_protocol_shape(model_server):
    r = httpx.post(f"{model_server.url}/v2/models/fraud/versions/2/infer", content=b"[" + b"1," * LIMIT + b"1]",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(LIMIT) in r.json()["error"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_model_server_refuses_bad_model_names(model_server, name):
    for path in (f"/v2/models/{name}", f"/v2/models/fraud/versions/{name}", f"/v2/models/{name}/ready",
                 f"/v2/models/{name}/stats"):
        r = httpx.get(f"{model_server.url}{path}")
        assert r.status_code in (400, 404), (path, r.status_code)
        assert isinstance(r.json()["error"], (str, dict))
    r = httpx.post(f"{model_server.url}/v2/models/{name}/infer", json={"inputs": []})
    assert r.status_code in (400, 404)


# -- orchestrator ---------------------------------------------------------------------------------------
@pytest.fixture
async def orch(model_server, database_url, redis_url):
    settings = OrchestratorSettings(model_urls=model_server.url, features_url=f"http://127.0.0.1:{free_port()}",
                                    database_url=database_url, redis_url=redis_url, max_body_bytes=LIMIT)
    app = orchestrator_app(settings)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://orch", timeout=30) as c):
        yield c


async def test_predict_rows_carry_the_ood_flag(orch, edges):
    typical = typical_row(edges)
    extreme = {**typical, "amount": edges["amount"][-1] * 3}
    r = await orch.post("/v1/predict/fraud", json={"instances": [typical, extreme], "version": "2"},
                        headers={"Cache-Control": "no-cache"})
    assert r.status_code == 200, r.text
    assert [p["ood"] for p in r.json()["predictions"]] == [False, True]
    r = await orch.post("/v1/predict/fraud", json={"inputs": typical, "version": "2"})
    assert r.json()["outputs"]["ood"] is False


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e400"])
async def test_predict_refuses_non_finite_values_with_422(orch, edges, literal):
    body = f'{{"inputs": {{"amount": {literal}, "txn_count_24h": 1}}}}'
    r = await orch.post("/v1/predict/fraud", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "NaN and infinite" in r.text


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_orchestrator_refuses_bad_model_names_and_versions(orch, edges, name):
    r = await orch.post(f"/v1/predict/{name}", json={"inputs": typical_row(edges)})
    assert r.status_code in (404, 422), r.text
    assert "error" in r.json()
    decoded = unquote(name)
    r = await orch.post("/v1/predict/fraud", json={"inputs": typical_row(edges), "version": decoded})
    assert r.status_code == 422
    r = await orch.post("/v1/embeddings", json={"input": "hi", "model": f"minilm:{decoded}"})
    assert r.status_code == 422
    r = await orch.get(f"/admin/models/{name}/policy")
    assert r.status_code in (404, 422)


async def test_embeddings_limit_batch_and_text_size(orch):
    assert (await orch.post("/v1/embeddings", json={"input": ["a"] * 257, "model": "minilm"})).status_code == 422
    assert (await orch.post("/v1/embeddings", json={"input": "a" * 8193, "model": "minilm"})).status_code == 422
    r = await orch.post("/v1/embeddings", json={"input": ["hello", "world"], "model": "minilm"})
    assert r.status_code == 200 and len(r.json()["data"]) == 2


async def test_orchestrator_body_limit_is_413_in_the_error_shape(orch):
    r = await orch.post("/v1/predict/fraud", content=b'{"inputs": {"a": "' + b"x" * LIMIT + b'"}}',
                        headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


# -- gateway ------------------------------------------------------------------------------------------
async def test_gateway_never_forwards_dot_segments_or_raw_control_characters(gw):  # noqa: F811
    token = (await login(gw))["access_token"]
    for path in ("/v1/features/%2e%2e/%2e%2e/admin/features/stats", "/v1/jobs/%2E%2E/%2e%2e/admin/x",
                 "/v1/features/%2e/x"):
        r = await gw.get(path, headers=bearer(token))
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_path", path
    r = await gw.get("/v1/features/a%03b%20c", headers=bearer(token))  # echo upstream: the path it saw
    assert r.status_code == 200 and r.json()["path"] == "/v1/features/a\x03b c"
