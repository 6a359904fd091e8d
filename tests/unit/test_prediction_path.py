"""Rows <-> v2 tensors, the contract between the orchestrator, the pipeline and the model server."""
from __future__ import annotations

import httpx
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


# -- issue 19: cache keys by value, coalescing keys, deadlines that are not replica failures -------
def test_cache_inputs_are_canonicalised_to_the_declared_types():
    from services.orchestrator.cache import cache_key, canonical_inputs

    def key(rows):
        return cache_key("m", "1", [("1", "sha256:x", canonical_inputs(encode_rows(META, rows)))])

    same = [{"a": 250, "b": 2}, {"a": 250.0, "b": 2.0}, {"a": 250.00000001, "b": 2}, {"a": "250", "b": 2, "z": 1}]
    assert len({key([row]) for row in same}) == 1
    assert key([{"a": 0.1, "b": 1}]) == key([{"a": 0.10000000149011612, "b": 1}])  # equal as FP32
    assert key([{"a": 250.5, "b": 2}]) != key([{"a": 250, "b": 2}])
    with pytest.raises(AppError) as exc:
        canonical_inputs(encode_rows(META, [{"a": 1e300, "b": 1}]))
    assert exc.value.status == 422


def test_cache_key_names_the_version_content():
    from services.orchestrator.cache import cache_key, canonical_inputs

    inputs = canonical_inputs(encode_rows(META, [{"a": 1, "b": 2}]))
    assert cache_key("m", "1", [("1", "sha256:old", inputs)]) != cache_key("m", "1", [("1", "sha256:new", inputs)])


def test_flight_key_separates_computations_that_differ():
    from services.orchestrator.cache import flight_key

    pinned = flight_key("k", pinned=True, fallback=None, timeout_s=5.0)
    routed = flight_key("k", pinned=False, fallback="2", timeout_s=5.0)
    assert len({pinned, routed, flight_key("k", pinned=False, fallback=None, timeout_s=5.0),
                flight_key("k", pinned=False, fallback="2", timeout_s=1.0)}) == 4
    assert routed == flight_key("k", pinned=False, fallback="2", timeout_s=5.0)


def test_shadow_share_is_by_request_id():
    import uuid

    from services.orchestrator.policy import Policy, mirrors

    policy = Policy(routes={"1": 100}, shadow={"version": "2", "percent": 25})
    share = sum(mirrors(policy, "fraud", uuid.uuid4().hex) for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3


def test_prediction_log_entries_round_trip_through_the_contract():
    from services.orchestrator.contract import FeedbackEntry, PredictionEntry

    entry = PredictionEntry(id="p1", time=1.5, principal="apikey:7", model="fraud", version="2", input_hash="h",
                            inputs=[{"amount": 1.0}], outputs=[{"label": 0}], latency_ms=2.0, cached=True)
    wire = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in entry.to_fields().items()}
    assert PredictionEntry.from_fields(wire) == entry
    fb = FeedbackEntry(prediction_id="p1", row=0, label=1, principal="u1", model="fraud", version="2", time=2.0)
    assert FeedbackEntry.from_fields({k: str(v) if not isinstance(v, bytes) else v.decode()
                                      for k, v in fb.to_fields().items()}) == fb
    with pytest.raises(ValueError):
        PredictionEntry.from_fields({b"model": b"fraud"})


async def _forward_through(error: type[httpx.TimeoutException] | None, deadline_s: float | None):
    from services.chassis.upstream import Proxy, UpstreamPool

    def handler(request: httpx.Request) -> httpx.Response:
        if error is not None:
            raise error("timed out", request=request)
        return httpx.Response(200)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), timeout=httpx.Timeout(10.0, connect=3.0))
    pool = UpstreamPool("model", ["http://a", "http://b"], eject_after=1)
    try:
        await Proxy(http, pool, retries=1).forward("POST", "/infer", b"{}", {}, timeout_s=deadline_s,
                                                    idempotent=True)
        return None, pool
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc, pool
    finally:
        await http.aclose()


@pytest.mark.parametrize("error", [httpx.ConnectTimeout, httpx.ReadTimeout])
async def test_a_callers_deadline_is_a_504_and_no_replica_failure(error):
    """A deadline shorter than the pool's own timeouts cut the attempt: the caller's budget ran out,
    the replica is not ejected, and the answer names the deadline (not "unreachable")."""
    exc, pool = await _forward_through(error, deadline_s=0.5)
    assert exc.status == 504 and exc.code == "deadline_exceeded" and "0.5 s" in exc.message
    assert all(r.failures == 0 and r.ejected_until == 0 for r in pool.replicas)


async def test_the_pools_own_timeouts_still_count_against_the_replica():
    exc, pool = await _forward_through(httpx.ConnectTimeout, deadline_s=None)
    assert exc.status == 503 and exc.code == "upstream_unavailable"
    assert all(r.ejected_until > 0 for r in pool.replicas)  # eject_after=1: both tried, both out
    exc, pool = await _forward_through(httpx.ReadTimeout, deadline_s=None)
    assert exc.status == 504 and exc.code == "upstream_timeout" and "10 s" in exc.message
    # A deadline at least as long as the pool's own read limit: the replica had its chance.
    exc, pool = await _forward_through(httpx.ReadTimeout, deadline_s=20.0)
    assert exc.status == 504 and exc.code == "upstream_timeout" and all(r.ejected_until > 0 for r in pool.replicas)


def test_the_orchestrator_imports_and_builds_without_numpy():
    """Issue 14: its image installs no numpy (pip install ".[orchestrator]")."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['numpy'] = None; sys.modules['pandas'] = None; sys.modules['torch'] = None\n"
            "from services.orchestrator.app import create_app\n"
            "from services.orchestrator.settings import OrchestratorSettings\n"
            "create_app(OrchestratorSettings(database_url='postgresql://h/d', redis_url='redis://h'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
