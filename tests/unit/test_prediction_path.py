"""Rows <-> v2 tensors, the contract between the orchestrator, the pipeline and the model server."""
from __future__ import annotations

import pytest

from services.chassis.errors import AppError
from services.model.client import MissingInputs, decode_rows, encode_rows
from services.orchestrator.schemas import PredictRequest

META = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1]},
                   {"name": "b", "datatype": "INT64", "shape": [-1]}]}


def test_encode_rows_builds_one_tensor_per_input():
    body = encode_rows(META, [{"a": 1, "b": 2}, {"a": 1.5, "b": 3}], "req-1")
    assert body == {"id": "req-1", "inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2], "data": [1.0, 1.5]},
        {"name": "b", "datatype": "INT64", "shape": [2], "data": [2, 3]}]}


def test_encode_rows_names_missing_features_and_rows():
    with pytest.raises(MissingInputs) as exc:
        encode_rows(META, [{"a": 1, "b": 2}, {"a": 1}])
    assert exc.value.status == 422 and exc.value.details == {"missing": ["b"], "rows": [1]}


def test_encode_rows_rejects_non_numeric():
    with pytest.raises(AppError) as exc:
        encode_rows(META, [{"a": "lots", "b": 2}])
    assert exc.value.code == "invalid_feature"


def test_decode_rows_splits_batched_outputs():
    response = {"outputs": [{"name": "label", "shape": [2], "datatype": "INT64", "data": [0, 1]},
                            {"name": "probability", "shape": [2, 2], "datatype": "FP32", "data": [.9, .1, .2, .8]}]}
    assert decode_rows(response) == [{"label": 0, "probability": [.9, .1]}, {"label": 1, "probability": [.2, .8]}]


def test_predict_request_needs_exactly_one_of_inputs_or_instances():
    with pytest.raises(ValueError):
        PredictRequest.model_validate({})
    with pytest.raises(ValueError):
        PredictRequest.model_validate({"inputs": {"a": 1}, "instances": [{"a": 1}]})
    assert PredictRequest.model_validate({"instances": [{"a": 1}, {"a": 2}]}).rows == [{"a": 1}, {"a": 2}]
