"""Input guards without servers: body size limit (chassis), NaN/Infinity, string and batch limits,
model names, and the OpenAPI document declaring the error shape."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from services.chassis.app import create_service_app
from services.chassis.limits import non_finite_path, set_body_limit
from services.chassis.settings import ServiceSettings
from services.model.client import check_name, is_valid_name
from services.model.repository import TensorSpec
from services.model.service import V2Error, decode_inputs, parse_infer_body

BAD_NAMES = ["../etc", "..", ".", "%2e%2e", "a/b", "a\\b", "a..b", ".hidden", "-x", "x" * 65, "", "é", "a b",
             "fraud\n", "fraud\x00", "a%2fb"]


class Body(BaseModel):
    text: str


def make_app(max_body_bytes: int = 1000) -> FastAPI:
    app = create_service_app(ServiceSettings(service_name="unit", max_body_bytes=max_body_bytes,
                                             ready_max_cpu_percent=100.0), title="unit")

    @app.post("/json")
    async def parsed(body: Body) -> dict:
        return {"len": len(body.text)}

    @app.post("/raw")
    async def raw(request: Request) -> dict:
        return {"len": len(await request.body())}

    @app.post("/upload/file")
    async def upload(request: Request) -> dict:
        return {"len": len(await request.body())}

    set_body_limit(app, "/upload", 5000)
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://t")


async def _chunks(n: int, size: int):
    for _ in range(n):
        yield b"x" * size


@pytest.mark.parametrize("path", ["/json", "/raw"])
async def test_body_over_the_limit_is_413_in_the_error_shape(path):
    async with client(make_app()) as c:
        r = await c.post(path, content=json.dumps({"text": "x" * 2000}), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large" and "1000" in r.json()["error"]["message"]
        # Chunked (no Content-Length): counted while read.
        r = await c.post(path, content=_chunks(10, 200), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        ok = await c.post(path, json={"text": "x" * 100})
        assert ok.status_code == 200


async def test_a_path_can_have_its_own_larger_limit():
    async with client(make_app()) as c:
        assert (await c.post("/upload/file", content=b"x" * 4000)).json() == {"len": 4000}
        assert (await c.post("/upload/file", content=b"x" * 6000)).status_code == 413
        assert (await c.post("/raw", content=b"x" * 4000)).status_code == 413


def test_the_limit_is_a_setting_per_service(monkeypatch):
    assert ServiceSettings().max_body_bytes == 10 * 1024 * 1024
    from services.model.settings import ModelSettings

    monkeypatch.setenv("MODEL_MAX_BODY_BYTES", "12345")
    assert ModelSettings().max_body_bytes == 12345


async def test_openapi_declares_the_error_shape_for_every_operation():
    async with client(make_app()) as c:
        doc = (await c.get("/openapi.json")).json()
    assert doc["components"]["schemas"]["HTTPValidationError"] == doc["components"]["schemas"]["Error"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["responses"]["4XX"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}, (method, path)


# -- NaN and infinity -------------------------------------------------------------------------------
def test_standard_json_lets_nan_and_1e400_through_so_the_guards_must_catch_them():
    values = json.loads('{"a": NaN, "b": [1, {"c": 1e400}], "d": -Infinity}')
    assert math.isnan(values["a"]) and values["b"][1]["c"] == math.inf
    assert non_finite_path(values) == "a"
    assert non_finite_path({"b": values["b"]}, "rows") == "rows.b.1.c"
    assert non_finite_path({"x": [1, 2.5, "NaN", None, True]}) is None


@pytest.mark.parametrize("body", ['{"inputs": {"amount": NaN}}', '{"instances": [{"amount": 1}, {"amount": 1e400}]}',
                                  '{"inputs": {"amount": [1, -Infinity]}}'])
def test_predict_request_refuses_non_finite_values(body):
    from services.orchestrator.schemas import PredictRequest

    with pytest.raises(ValidationError, match="NaN and infinite"):
        PredictRequest.model_validate(json.loads(body))


def test_feedback_and_push_refuse_non_finite_values():
    from services.features.schemas import PushRequest
    from services.orchestrator.schemas import FeedbackRequest

    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate(json.loads('{"prediction_id": "p", "label": NaN}'))
    with pytest.raises(ValidationError, match="rows.0.x"):
        PushRequest.model_validate(json.loads('{"view": "v", "rows": [{"x": Infinity}]}'))


SPEC = [TensorSpec("x", "FP32", [-1]), TensorSpec("h", "FP16", [-1])]


def _v2(x, h=(1.0,), datatype="FP32"):
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": [len(x)], "data": list(x)},
                       {"name": "h", "datatype": "FP16", "shape": [len(h)], "data": list(h)}]}


@pytest.mark.parametrize("x, h", [([math.nan], [1.0]), ([math.inf], [1.0]), ([1e300], [1.0]), ([1.0], [1e6])])
def test_model_server_refuses_non_finite_and_out_of_range_floats(x, h):
    with pytest.raises(V2Error) as exc:
        decode_inputs(_v2(x, h), SPEC)
    assert exc.value.status == 400 and "NaN or infinite" in exc.value.message


def test_model_server_refuses_nan_literals_in_json_and_nan_in_binary_data():
    with pytest.raises(V2Error) as exc:
        parse_infer_body(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}')
    assert exc.value.status == 400
    with pytest.raises(V2Error):
        parse_infer_body(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1e400]}]}')
    head = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
        {"name": "h", "datatype": "FP16", "shape": [2], "data": [1, 2]}]}).encode()
    body = parse_infer_body(head + np.array([1.0, np.nan], dtype="<f4").tobytes(), str(len(head)))
    with pytest.raises(V2Error) as exc:
        decode_inputs(body, SPEC)
    assert exc.value.status == 400 and "'x'" in exc.value.message


def test_model_server_refuses_an_empty_batch_and_shapes_that_overflow():
    with pytest.raises(V2Error, match="no rows"):
        decode_inputs(_v2([], []), SPEC)
    huge = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**32, 2**32], "data": []}]}
    with pytest.raises(V2Error):
        decode_inputs(huge, [TensorSpec("x", "FP32", [-1, -1])])


# -- strings and batches ----------------------------------------------------------------------------
def test_embeddings_limit_texts_per_request_and_characters_per_text():
    from services.orchestrator.schemas import MAX_TEXT_CHARS, MAX_TEXTS, EmbeddingsRequest

    EmbeddingsRequest(input=["a"] * MAX_TEXTS, model="minilm")
    EmbeddingsRequest(input="a" * MAX_TEXT_CHARS, model="minilm:1")
    for bad in (["a"] * (MAX_TEXTS + 1), "a" * (MAX_TEXT_CHARS + 1), ["a", "b" * (MAX_TEXT_CHARS + 1)]):
        with pytest.raises(ValidationError):
            EmbeddingsRequest(input=bad, model="minilm")
    for model in ("../minilm", "minilm:../1", "a/b", "m" * 65):
        with pytest.raises(ValidationError):
            EmbeddingsRequest(input="a", model=model)


def test_free_text_fields_have_a_length_limit():
    from services.features.schemas import EntitySpec
    from services.orchestrator.schemas import FeedbackRequest, PolicyUpdate

    with pytest.raises(ValidationError):
        FeedbackRequest(prediction_id="p", label="x" * 257)
    with pytest.raises(ValidationError):
        PolicyUpdate.model_validate({"policy": {}, "reason": "x" * 1001})
    with pytest.raises(ValidationError):
        EntitySpec(name="e", join_key="k", description="x" * 2001)


# -- model names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fraud", "minilm", "1", "all-MiniLM-L6-v2", "v1.2_final"])
def test_good_model_names(name):
    assert is_valid_name(name) and check_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_model_names_never_reach_a_path_url_or_key(name, models_dir):
    from services.model.service import DataPlane
    from services.orchestrator.schemas import PredictRequest

    assert not is_valid_name(name)
    with pytest.raises(Exception) as exc:
        check_name(name)
    assert exc.value.status == 422
    with pytest.raises(ValidationError):
        PredictRequest(inputs={"a": 1}, version=name)
    plane = DataPlane(models_dir)  # nothing loaded: the name check comes before any lookup
    with pytest.raises(V2Error) as exc:
        plane.resolve(name or "x", name)
    assert exc.value.status == 400


def test_repository_scan_skips_folders_that_are_not_valid_names(tmp_path):
    from services.model.repository import MANIFEST, scan

    for model, version in (("fraud", "1"), (".tmp-fraud", "1"), ("fraud", ".partial"), ("bad name", "1")):
        (tmp_path / model / version).mkdir(parents=True, exist_ok=True)
        (tmp_path / model / version / MANIFEST).write_text("{}")
    assert {m: sorted(v) for m, v in scan(tmp_path).items()} == {"fraud": ["1"]}


def test_pipeline_drift_and_training_refuse_bad_names(tmp_path):
    from services.pipeline.drift import load_baseline
    from services.pipeline.training import train_and_register

    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "baseline.json").write_text('{"a": [0, 1]}')
    assert load_baseline(tmp_path / "models", "..", "etc") is None
    assert train_and_register(None, "../x", {}, [])["status"] == "refused"  # before any call
