"""Issue 17.1: a replica whose CPU is pegged stays in the pool and sheds the excess per request.

Readiness that failed on host CPU took the busiest replicas out of rotation one after another
(a cascading failure). Here the machine's every core is busy and the model server gets far more
concurrent requests than it admits: it answers the excess 503 + Retry-After, serves the rest,
and /ready keeps saying 200 throughout.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest

from services.model.app import create_app
from services.model.settings import ModelSettings
from tests.conftest import ServedApp
from tests.integration.test_model_server import fraud_body


@pytest.fixture
def busy_cpu():
    """One busy loop per core, and one more: psutil reads ~100% CPU for the whole test."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range((os.cpu_count() or 1) + 1)]
    try:
        yield
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()


async def test_loaded_replica_stays_ready_while_shedding_excess(models_dir, busy_cpu):
    app = create_app(ModelSettings(repository=models_dir, max_inflight=3))
    with ServedApp(app) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as c:
            assert (await c.get("/ready")).status_code == 200
            url = "/v2/models/fraud/infer"
            answers = await asyncio.gather(*(c.post(url, json=fraud_body(64)) for _ in range(60)))
            ready_during = await c.get("/ready")
            health = (await c.get("/health")).json()
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    shed = next(r for r in answers if r.status_code == 503)
    assert shed.headers["retry-after"] and shed.json()["error"]["code"] == "overloaded"
    assert ready_during.status_code == 200, ready_during.text
    assert health["details"]["cpu_percent"] > 0  # the load shows up where it belongs
