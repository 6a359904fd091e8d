"""Batch uploads stream through the gateway: larger than its in-memory body limit, capped by its own."""
from __future__ import annotations

import time

import httpx
import pytest

from services.demo import synthetic

pytestmark = pytest.mark.e2e


def test_upload_larger_than_the_body_limit_streams_to_the_pipeline(stack, admin_headers):
    header = ",".join(synthetic.FRAUD_FEATURES)
    line = ",".join(["123.456789"] * len(synthetic.FRAUD_FEATURES))
    rows = 40_000  # about 2.8 MB: over the gateway's 1 MiB limit for ordinary bodies
    csv = (header + "\n" + "\n".join([line] * rows) + "\n").encode()
    assert len(csv) > 2 * 1_048_576
    gw = stack.url("gateway")
    r = httpx.post(f"{gw}/v1/jobs/batch-inference", headers=admin_headers, timeout=120,
                   files={"file": ("big.csv", csv, "text/csv")}, data={"model": "fraud", "version": "1"})
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    deadline = time.monotonic() + 120
    while True:
        status = httpx.get(f"{gw}/v1/jobs/{job}", headers=admin_headers, timeout=30).json()
        if status["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status["status"] == "succeeded", status
    assert status["progress"]["done_rows"] == rows


def test_ordinary_routes_keep_the_small_body_limit(stack, admin_headers):
    big = b'{"inputs": {"amount": 1, "pad": "' + b"x" * 1_100_000 + b'"}}'
    r = httpx.post(f"{stack.url('gateway')}/v1/predict/fraud", content=big, timeout=60,
                   headers={**admin_headers, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
