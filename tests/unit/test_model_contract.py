"""The model server's published contract (services/model/client.py): light, one mapping, one codec."""
from __future__ import annotations

import subprocess
import sys

import pytest

from services.chassis.errors import AppError
from services.model import client
from services.model.client import (
    FeatureBinding,
    MissingInputs,
    ModelUnavailable,
    decode_columns,
    decode_rows,
    encode_columns,
    encode_rows,
    error_from_response,
)

META = {"name": "fraud", "inputs": [{"name": "amount", "datatype": "FP32", "shape": [-1]},
                                    {"name": "n", "datatype": "INT64", "shape": [-1]}],
        "parameters": {"version": "2", "entity": "customer", "feature_view": "customer_transactions",
                       "request_features": ["amount"]}}


def test_contract_imports_nothing_heavy_and_no_other_model_module():
    code = ("import sys, services.model.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'pandas', 'torch', 'sklearn') "
            "or (m.startswith('services.model.') and m != 'services.model.client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_repository_takes_the_name_rules_from_the_contract():
    from services.model import repository

    assert repository.is_valid_name is client.is_valid_name
    assert repository.NAME_PATTERN == client.NAME_PATTERN


@pytest.mark.parametrize(("status", "code", "cls", "out"), [
    (404, "model_not_found", AppError, 404), (400, "invalid_inputs", AppError, 422),
    (413, "payload_too_large", AppError, 413), (503, "model_unavailable", ModelUnavailable, 503),
    (429, "model_unavailable", ModelUnavailable, 503), (500, "model_error", ModelUnavailable, 502),
    (504, "model_timeout", ModelUnavailable, 504), (403, "model_forbidden", ModelUnavailable, 502),
])
def test_one_error_mapping(status, code, cls, out):
    err = error_from_response(status, b'{"error": "boom"}', {"retry-after": "3"})
    assert isinstance(err, cls) and err.code == code and err.status == out
    assert "boom" in err.message or code == "model_forbidden"
    if out == 503:
        assert err.headers["Retry-After"] == "3"


def test_error_message_from_the_stack_shape_and_from_text():
    assert error_from_response(403, b'{"error": {"code": "forbidden", "message": "token"}}').message.endswith("token")
    assert error_from_response(500, b"plain failure").message == "plain failure"


def test_rows_and_columns_encode_to_the_same_request():
    rows = [{"amount": "1.5", "n": 2}, {"amount": 3, "n": "4"}]
    by_rows = encode_rows(META, rows, request_id="r1")
    by_cols = encode_columns(META, {"amount": [1.5, 3.0], "n": [2, 4]}, 2, request_id="r1")
    assert by_rows == by_cols
    assert by_rows["inputs"][0] == {"name": "amount", "datatype": "FP32", "shape": [2], "data": [1.5, 3.0]}


def test_missing_and_mistyped_inputs_are_the_callers_422():
    with pytest.raises(MissingInputs) as missing:
        encode_rows(META, [{"amount": 1}, {"amount": None, "n": 1}])
    assert missing.value.details == {"missing": ["amount", "n"], "rows": [0, 1]}
    with pytest.raises(MissingInputs):
        encode_columns(META, {"amount": [1.0]}, 1)
    with pytest.raises(AppError) as bad:
        encode_rows(META, [{"amount": "x", "n": 1}])
    assert bad.value.code == "invalid_feature"


def test_decoders_split_a_2d_output_per_row_and_per_column():
    response = {"outputs": [{"name": "label", "shape": [2], "data": [0, 1]},
                            {"name": "probability", "shape": [2, 2], "data": [0.9, 0.1, 0.2, 0.8]}],
                "parameters": {"ood": [False, True]}}
    assert decode_rows(response) == [{"label": 0, "probability": [0.9, 0.1], "ood": False},
                                      {"label": 1, "probability": [0.2, 0.8], "ood": True}]
    assert decode_columns(response) == {"label": [0, 1], "probability_0": [0.9, 0.2], "probability_1": [0.1, 0.8]}


def test_feature_binding_is_typed_and_round_trips():
    binding = FeatureBinding.from_metadata(META)
    assert binding == FeatureBinding("customer", "customer_transactions", "customer_id", ("amount",))
    assert FeatureBinding.from_parameters(binding.as_parameters()) == binding
    assert FeatureBinding.from_metadata({"parameters": {"entity": "customer"}}) is None


def test_baseline_edges_are_numpys_linear_quantiles():
    np = pytest.importorskip("numpy")
    x = np.random.default_rng(3).normal(size=1001)
    assert client.baseline_edges({"f": x.tolist()})["f"] == np.quantile(x, np.linspace(0, 1, 11)).round(6).tolist()
