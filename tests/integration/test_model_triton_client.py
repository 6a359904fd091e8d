"""NVIDIA's own Triton HTTP client, unchanged, against the model server (binary and JSON tensors)."""
from __future__ import annotations

import joblib
import numpy as np
import pytest

from services.demo.synthetic import FRAUD_FEATURES
from services.model.app import create_app
from services.model.settings import ModelSettings
from tests.conftest import ServedApp

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")


@pytest.fixture(scope="module")
def triton(models_dir):
    app = create_app(ModelSettings(repository=models_dir, ready_max_cpu_percent=100))
    with ServedApp(app) as served:
        client = httpclient.InferenceServerClient(url=served.url.removeprefix("http://"))
        yield client
        client.close()


def test_health_and_metadata_through_the_triton_client(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("fraud", "1")
    meta = triton.get_model_metadata("fraud", "1")
    assert [i["name"] for i in meta["inputs"]] == FRAUD_FEATURES
    assert triton.get_server_metadata()["name"]


@pytest.mark.parametrize("binary", [True, False])
def test_fraud_inference_equals_the_artifact(triton, models_dir, binary):
    rng = np.random.default_rng(3)
    x = rng.uniform(1, 50, size=(4, len(FRAUD_FEATURES))).astype(np.float32)
    inputs = []
    for i, name in enumerate(FRAUD_FEATURES):
        tensor = httpclient.InferInput(name, [4], "FP32")
        tensor.set_data_from_numpy(x[:, i], binary_data=binary)
        inputs.append(tensor)
    outputs = [httpclient.InferRequestedOutput("probability", binary_data=binary)]
    result = triton.infer("fraud", inputs, model_version="1", outputs=outputs)
    expected = joblib.load(models_dir / "fraud" / "1" / "model.joblib").predict_proba(x)
    np.testing.assert_allclose(result.as_numpy("probability"), expected, rtol=1e-5)


def test_text_in_bytes_out_embeddings(triton):
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello world", b"a second sentence"], dtype=np.object_))
    result = triton.infer("minilm", [text], model_version="1")
    emb = result.as_numpy("embedding")
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)


def test_errors_reach_the_client_as_exceptions(triton):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="not found"):
        triton.get_model_metadata("no-such-model")
