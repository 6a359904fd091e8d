"""The official `openai` SDK, pointed at the gateway with an aistack API key, gets embeddings."""
from __future__ import annotations

import math

import httpx
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api_key(stack, admin_headers) -> str:
    r = httpx.post(f"{stack.url('gateway')}/admin/api-keys", headers=admin_headers, timeout=30,
                   json={"name": "openai-sdk-test", "role": "service"})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_openai_sdk_gets_embeddings_through_the_gateway(stack, api_key):
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.url('gateway')}/v1", api_key=api_key, max_retries=0, timeout=60)
    texts = ["A cat sits on the mat.", "Quarterly revenue grew by four percent."]
    # The SDK asks for base64 by default and decodes it: the wire format is exercised too.
    result = client.embeddings.create(model="minilm:1", input=texts)
    assert [d.index for d in result.data] == [0, 1]
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    assert result.usage.prompt_tokens > 0

    # Same numbers as the model server gives for the same text, straight over v2.
    direct = httpx.post(f"{stack.url('model')}/v2/models/minilm/versions/1/infer", timeout=60, json={
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}).json()
    flat = direct["outputs"][0]["data"]
    for i, v in enumerate(vectors):
        assert cosine(v, flat[i * 384:(i + 1) * 384]) > 0.9999

    floats = client.embeddings.create(model="minilm:1", input="A cat sits on the mat.", encoding_format="float")
    assert cosine(floats.data[0].embedding, vectors[0]) > 0.9999


def test_embeddings_errors_are_openai_shaped_enough_for_the_sdk(stack, api_key):
    from openai import BadRequestError, NotFoundError, OpenAI, UnprocessableEntityError

    client = OpenAI(base_url=f"{stack.url('gateway')}/v1", api_key=api_key, max_retries=0, timeout=60)
    with pytest.raises((NotFoundError,)):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises((BadRequestError, UnprocessableEntityError)):
        client.embeddings.create(model="minilm", input="")
