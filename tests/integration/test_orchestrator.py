"""The orchestrator against a real model server (uvicorn, real models), real Redis and Postgres."""
from __future__ import annotations

import asyncio
import uuid

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from services.model.app import create_app as model_app
from services.model.settings import ModelSettings
from services.orchestrator.app import create_app as orchestrator_app
from services.orchestrator.policy import choose_version, Policy
from services.orchestrator.service import FALLBACKS, FEEDBACK_STREAM, PREDICTION_STREAM, SHADOW
from services.orchestrator.settings import OrchestratorSettings
from tests.conftest import ServedApp, free_port

ROW = {"amount": 250.0, "txn_count_24h": 5, "txn_amount_24h": 400.0, "avg_amount_30d": 40.0,
       "account_age_days": 30, "chargebacks_90d": 1, "distinct_merchants_7d": 6}
INFER_ROUTE = '/v2/models/{model}/versions/{version}/infer'


@pytest.fixture(scope="module")
def model_server(models_dir):
    app = model_app(ModelSettings(repository=models_dir, ready_max_cpu_percent=100))
    with ServedApp(app) as served:
        served.app = app
        yield served


def _settings(model_server, database_url, redis_url, **kw) -> OrchestratorSettings:
    return OrchestratorSettings(model_urls=model_server.url, features_url=f"http://127.0.0.1:{free_port()}",
                                database_url=database_url, redis_url=redis_url, **kw)


@pytest.fixture
async def orch(model_server, database_url, redis_url):
    app = orchestrator_app(_settings(model_server, database_url, redis_url))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://orch", timeout=30) as c:
            c.app = app
            yield c


async def _reset(database_url: str, redis_url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from services.chassis.clients import asyncpg_url

    engine = create_async_engine(asyncpg_url(database_url))
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM orchestrator.policies"))
    await engine.dispose()
    r = aioredis.from_url(redis_url)
    async for key in r.scan_iter(match="orchestrator:cache:*"):
        await r.delete(key)
    await r.aclose()


@pytest.fixture(autouse=True)
async def clean_policies(database_url, redis_url):
    """Each test starts from the default policy and an empty cache, and leaves them so for the
    stacks of other modules that share this run's database."""
    await _reset(database_url, redis_url)
    yield
    await _reset(database_url, redis_url)


def infer_count(model_server, version: str) -> float:
    text = httpx.get(f"{model_server.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("aistack_http_requests_total{") and 'service="model"' in line \
                and f'route="{INFER_ROUTE}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def predict(c, principal="alice", headers=None, **body):
    body = body or {"inputs": ROW}
    r = await c.post("/v1/predict/fraud", json=body, headers={"X-Principal": principal, **(headers or {})})
    assert r.status_code == 200, r.text
    return r.json()


async def set_policy(c, policy: dict, who="ops") -> dict:
    r = await c.put("/admin/models/fraud/policy", json={"policy": policy, "reason": "test"},
                    headers={"X-Principal": who})
    assert r.status_code == 200, r.text
    return r.json()


async def test_cache_hit_returns_same_output_marked_cached(orch):
    first = await predict(orch, inputs={**ROW, "amount": 111.0})
    second = await predict(orch, inputs={**ROW, "amount": 111.0})
    assert first["cached"] is False and second["cached"] is True
    assert second["outputs"] == first["outputs"] and second["version"] == first["version"]
    assert second["prediction_id"] != first["prediction_id"]
    bypass = await predict(orch, inputs={**ROW, "amount": 111.0}, headers={"Cache-Control": "no-cache"})
    assert bypass["cached"] is False and bypass["outputs"] == first["outputs"]


async def test_fifty_concurrent_identical_misses_make_one_inference(orch, model_server):
    before = infer_count(model_server, "2")
    results = await asyncio.gather(*(predict(orch, inputs={**ROW, "amount": 77.7}) for _ in range(50)))
    assert infer_count(model_server, "2") - before == 1
    assert len({orjson.dumps(r["outputs"]) for r in results}) == 1
    assert sum(not r["cached"] for r in results) == 1


def test_ab_split_is_within_three_points_and_sticky():
    policy = Policy(routes={"1": 30, "2": 70})
    picks = [choose_version(policy, "fraud", f"user-{i}") for i in range(2000)]
    share = picks.count("1") / len(picks)
    assert abs(share - 0.30) <= 0.03
    assert picks == [choose_version(policy, "fraud", f"user-{i}") for i in range(2000)]


async def test_canary_routes_each_principal_as_the_policy_says(orch):
    await set_policy(orch, {"routes": {"1": 90, "2": 10}, "cache_ttl_s": 0})
    policy = Policy(routes={"1": 90, "2": 10})
    served = {}
    for i in range(120):
        body = await predict(orch, principal=f"p{i}")
        served[f"p{i}"] = body["version"]
        assert body["version"] == choose_version(policy, "fraud", f"p{i}")
    assert set(served.values()) == {"1", "2"}
    # Sticky: the same principal lands on the same version again.
    for p in list(served)[:20]:
        assert (await predict(orch, principal=p))["version"] == served[p]


async def test_blue_green_switch_and_rollback_with_history(orch):
    await set_policy(orch, {"routes": {"1": 100}}, who="alice")
    assert {(await predict(orch, principal=f"u{i}"))["version"] for i in range(10)} == {"1"}
    await set_policy(orch, {"routes": {"2": 100}}, who="bob")
    assert {(await predict(orch, principal=f"u{i}"))["version"] for i in range(10)} == {"2"}
    r = await orch.post("/admin/models/fraud/policy/rollback", json={}, headers={"X-Principal": "carol"})
    assert r.status_code == 200 and r.json()["policy"]["routes"] == {"1": 100.0}
    assert {(await predict(orch, principal=f"u{i}"))["version"] for i in range(10)} == {"1"}
    history = (await orch.get("/admin/models/fraud/policy/history")).json()
    assert [h["author"] for h in history] == ["carol", "bob", "alice"]
    assert "rollback" in history[0]["reason"]


async def test_policy_with_unknown_version_is_refused(orch):
    r = await orch.put("/admin/models/fraud/policy", json={"policy": {"routes": {"9": 100}}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_version"


async def test_shadow_mirrors_without_touching_the_response(orch):
    await set_policy(orch, {"routes": {"1": 100}, "shadow": {"version": "2", "percent": 100}})
    before = sum(SHADOW.labels("fraud", "2", a)._value.get() for a in ("true", "false"))
    body = await predict(orch, inputs={**ROW, "amount": 5.0})
    await orch.app.state.predictor.drain()
    after = sum(SHADOW.labels("fraud", "2", a)._value.get() for a in ("true", "false"))
    assert body["version"] == "1" and after - before == 1


async def test_ensemble_mean_of_probabilities(orch):
    one = await predict(orch, inputs=ROW, version="1")
    two = await predict(orch, inputs=ROW, version="2")
    await set_policy(orch, {"ensemble": {"versions": ["1", "2"], "method": "mean"}})
    body = await predict(orch)
    assert body["version"] == "ensemble(1,2:mean)"
    expected = [(a + b) / 2 for a, b in zip(one["outputs"]["probability"], two["outputs"]["probability"])]
    assert body["outputs"]["probability"] == pytest.approx(expected, rel=1e-6)


async def test_fallback_when_the_chosen_version_fails(orch, model_server):
    await set_policy(orch, {"routes": {"2": 100}, "fallback": "1"})
    batcher = model_server.app.state.plane.models["fraud"]["2"].batcher
    original = batcher._predict

    def broken(inputs):
        raise RuntimeError("GPU fell off the bus")

    batcher._predict = broken
    before = FALLBACKS.labels("fraud", "2", "1")._value.get()
    try:
        body = await predict(orch, inputs={**ROW, "amount": 3.0})
        again = await predict(orch, inputs={**ROW, "amount": 3.0})
    finally:
        batcher._predict = original
    assert body["version"] == "1" and again["cached"] is False  # a fallback answer is never cached
    assert FALLBACKS.labels("fraud", "2", "1")._value.get() - before == 2
    assert (await predict(orch, inputs={**ROW, "amount": 3.0}))["version"] == "2"


async def test_prediction_log_and_feedback(orch, redis_url):
    body = await predict(orch, inputs={**ROW, "amount": 42.0})
    r = aioredis.from_url(redis_url)
    try:
        entries = await r.xrevrange(PREDICTION_STREAM, count=20)
        entry = next(f for _, f in entries if f[b"id"].decode() == body["prediction_id"])
        assert entry[b"model"] == b"fraud" and orjson.loads(entry[b"inputs"])[0]["amount"] == 42.0
        fb = await orch.post("/v1/feedback", json={"prediction_id": body["prediction_id"], "label": 1},
                             headers={"X-Principal": "alice"})
        assert fb.status_code == 202, fb.text
        last = (await r.xrevrange(FEEDBACK_STREAM, count=1))[0][1]
        assert last[b"prediction_id"].decode() == body["prediction_id"] and orjson.loads(last[b"label"]) == 1
    finally:
        await r.aclose()
    missing = await orch.post("/v1/feedback", json={"prediction_id": "nope", "label": 1})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "prediction_not_found"


async def test_feedback_only_from_the_predictions_principal_owner_or_admin(orch, redis_url):
    """Issue 13: another caller's prediction answers 404 like an unknown one; the principal, a key of
    the same owning user, and an admin (audited) may label it."""
    user, stranger = f"u-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"
    pid = (await predict(orch, principal=user, inputs={**ROW, "amount": 43.0}))["prediction_id"]

    async def label(**headers):
        return await orch.post("/v1/feedback", json={"prediction_id": pid, "label": 1}, headers=headers)

    for headers in ({"X-Principal": stranger}, {"X-Principal": stranger, "X-Principal-Owner": stranger},
                    {"X-Principal": stranger, "X-Principal-Role": "developer"}, {}):
        r = await label(**headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "prediction_not_found", (headers, r.text)
    assert (await label(**{"X-Principal": user})).status_code == 202
    assert (await label(**{"X-Principal": "apikey:k1", "X-Principal-Owner": user})).status_code == 202
    r = aioredis.from_url(redis_url)
    try:
        before = await r.xlen("auth:audit:events")
        assert (await label(**{"X-Principal": stranger, "X-Principal-Role": "admin"})).status_code == 202
        [(_, event)] = await r.xrevrange("auth:audit:events", count=1)
        assert await r.xlen("auth:audit:events") == before + 1 and pid.encode() in b"".join(event.values())
    finally:
        await r.aclose()


async def test_redis_down_serves_predictions_without_cache(model_server, database_url):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    app = orchestrator_app(_settings(model_server, database_url, closed))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://o") as c:
            first = await predict(c)
            second = await predict(c)
            ready = await c.get("/ready")
    assert first["cached"] is False and second["cached"] is False
    assert first["outputs"] == second["outputs"]
    assert ready.status_code == 503 and "redis" in ready.json()["error"]["details"]


async def test_bad_requests_are_4xx(orch):
    r = await orch.post("/v1/predict/fraud", json={"instances": []})
    assert r.status_code == 422
    r = await orch.post("/v1/predict/fraud", json={"inputs": {**ROW, "amount": "lots"}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_feature"
    r = await orch.post("/v1/predict/fraud", json={"instances": [ROW] * 1001})
    assert r.status_code == 413
    r = await orch.put("/admin/models/fraud/policy", json={"policy": {"routes": {"1": -1}}})
    assert r.status_code == 422


@pytest.fixture(scope="module")
def feature_store(database_url, redis_url):
    from services.features.app import create_app as features_app
    from services.features.settings import FeaturesSettings

    app = features_app(FeaturesSettings(database_url=database_url, redis_url=redis_url, seed_customers=50,
                                        ready_max_cpu_percent=100))
    with ServedApp(app) as served:
        yield served


async def test_features_are_enriched_from_the_online_store(model_server, feature_store, database_url, redis_url):
    import uuid

    from services.demo import synthetic

    settings = _settings(model_server, database_url, redis_url)
    settings.features_url = feature_store.url
    app = orchestrator_app(settings)
    ids = [f"T-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    supplied = [{f: float(i + 1) * (k + 2) for k, f in enumerate(synthetic.CUSTOMER_FEATURES)} for i in range(2)]
    pushed = httpx.post(f"{feature_store.url}/v1/features/push", json={
        "view": "customer_transactions", "rows": [{"customer_id": c, **f} for c, f in zip(ids, supplied)]})
    assert pushed.status_code == 200, pushed.text
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://o") as c:
            enriched = await predict(c, inputs={"customer_id": ids[0], "amount": 80.0}, version="1")
            explicit = await predict(c, inputs={**supplied[0], "amount": 80.0}, version="1")
            batch = await predict(c, instances=[{"customer_id": ids[0], "amount": 80.0},
                                                {"customer_id": ids[1], "amount": 5.0}], version="1")
            second = await predict(c, inputs={**supplied[1], "amount": 5.0}, version="1")
            unknown = await c.post("/v1/predict/fraud", json={"inputs": {"customer_id": "NOPE", "amount": 1.0}})
            override = await predict(c, inputs={"customer_id": "NOPE", "amount": 80.0, **supplied[0]}, version="1")
    assert enriched["outputs"]["probability"] == pytest.approx(explicit["outputs"]["probability"], rel=1e-5)
    assert batch["predictions"] == [enriched["outputs"], second["outputs"]]
    assert unknown.status_code == 422
    error = unknown.json()["error"]
    assert error["code"] == "missing_features" and error["details"]["txn_count_24h"]["ids"] == ["NOPE"]
    assert override["outputs"] == explicit["outputs"]  # supplied features win; nothing to look up


# -- issue 19: coalescing, bounded labels, deadlines, cache keys by value, shadow sampling ---------
class broken_version:
    """Make one version of the in-process model server fail (or answer late) while in the block."""

    def __init__(self, model_server, version: str, delay_s: float = 0.0, fail: bool = True):
        self.batcher = model_server.app.state.plane.models["fraud"][version].batcher
        self.delay_s, self.fail = delay_s, fail

    def __enter__(self):
        import time

        self.original = original = self.batcher._predict

        def predict(inputs):
            time.sleep(self.delay_s)
            if self.fail:
                raise RuntimeError("GPU fell off the bus")
            return original(inputs)

        self.batcher._predict = predict
        return self

    def __exit__(self, *exc):
        self.batcher._predict = self.original


async def test_concurrent_pinned_and_routed_requests_never_share_a_fallback_answer(orch, model_server):
    """Routed requests may fall back, pinned ones may not: sent at the same moment with the same
    inputs, each gets its own kind of answer, and a fallback answer is never reported cached."""
    await set_policy(orch, {"routes": {"1": 100}, "fallback": "2"})

    async def send(i: int, version: str | None):
        body = {"inputs": {**ROW, "amount": 900.0 + i}, **({"version": version} if version else {})}
        return await orch.post("/v1/predict/fraud", json=body, headers={"X-Principal": "alice"})

    with broken_version(model_server, "1", delay_s=0.05):
        for i in range(10):
            routed_a, pinned_a, routed_b, pinned_b, pinned_2 = await asyncio.gather(
                send(i, None), send(i, "1"), send(i, None), send(i, "1"), send(i, "2"))
            for routed in (routed_a, routed_b):
                assert routed.status_code == 200, routed.text
                body = routed.json()
                assert (body["version"], body["cached"], body["fallback"]) == ("2", False, True)
            for pinned in (pinned_a, pinned_b):
                assert pinned.status_code == 502, pinned.text
                assert pinned.json()["error"]["code"] == "model_error"
            assert pinned_2.status_code == 200 and pinned_2.json()["version"] == "2"
            assert pinned_2.json()["cached"] is False and "fallback" not in pinned_2.json()


async def test_policy_timeout_is_a_504_naming_the_deadline_and_ejects_no_replica(orch, model_server):
    from services.chassis.upstream import EJECTIONS

    await set_policy(orch, {"routes": {"1": 100}, "timeout_s": 0.05, "cache_ttl_s": 0})
    ejections = EJECTIONS.labels("model")._value.get()
    with broken_version(model_server, "1", delay_s=0.3, fail=False):
        answers = [await orch.post("/v1/predict/fraud", json={"inputs": ROW, **pinned})
                   for pinned in ({}, {"version": "1"}) * 3]
    for r in answers:
        assert r.status_code == 504, r.text
        error = r.json()["error"]
        assert error["code"] == "deadline_exceeded"
        assert "timeout_s of 0.05 s" in error["message"] and error["details"]["timeout_s"] == 0.05
    assert EJECTIONS.labels("model")._value.get() == ejections
    replicas = orch.app.state.model_pool.replicas
    assert all(r.ejected_until == 0 and r.failures == 0 for r in replicas)
    await set_policy(orch, {"routes": {"1": 100}})
    assert (await predict(orch, inputs=ROW))["version"] == "1"  # the replica still serves


async def test_cache_keys_compare_values_as_the_model_reads_them(orch):
    """250 and 250.0 (and values equal once cast to the model's FP32 input) are one entry; a field
    the model does not read does not split the cache either."""
    first = await predict(orch, inputs={**ROW, "amount": 250, "txn_count_24h": 0.1}, version="1")
    as_float = await predict(orch, inputs={**ROW, "amount": 250.0, "txn_count_24h": 0.1}, version="1")
    same_fp32 = await predict(orch, inputs={**ROW, "amount": 250.00000001, "txn_count_24h": 0.10000000149011612},
                              version="1")
    extra = await predict(orch, inputs={**ROW, "amount": 250, "txn_count_24h": 0.1, "note": "x"}, version="1")
    other = await predict(orch, inputs={**ROW, "amount": 250.5, "txn_count_24h": 0.1}, version="1")
    assert first["cached"] is False
    assert as_float["cached"] is True and same_fp32["cached"] is True and extra["cached"] is True
    assert as_float["outputs"] == first["outputs"] and other["cached"] is False


async def test_shadow_mirrors_a_share_of_requests_by_request_id(orch):
    """The same input, sent 200 times, is mirrored about half the time (percent 50): sampling is by
    request, not by input (which would mirror an input always or never)."""
    await set_policy(orch, {"routes": {"1": 100}, "shadow": {"version": "2", "percent": 50}, "cache_ttl_s": 0})
    before = sum(SHADOW.labels("fraud", "2", a)._value.get() for a in ("true", "false", "error"))
    for _ in range(200):
        await predict(orch, inputs={**ROW, "amount": 6.0})
    await orch.app.state.predictor.drain()
    mirrored = sum(SHADOW.labels("fraud", "2", a)._value.get() for a in ("true", "false", "error")) - before
    assert 60 <= mirrored <= 140  # binomial(200, 0.5): more than 5 standard deviations either side


async def test_cache_hits_are_not_mirrored_unless_asked(orch):
    await set_policy(orch, {"routes": {"1": 100}, "shadow": {"version": "2", "percent": 100}})

    def mirrored() -> float:
        return sum(SHADOW.labels("fraud", "2", a)._value.get() for a in ("true", "false", "error"))

    before = mirrored()
    answers = [await predict(orch, inputs={**ROW, "amount": 7.0}) for _ in range(5)]
    await orch.app.state.predictor.drain()
    assert [a["cached"] for a in answers] == [False, True, True, True, True]
    assert mirrored() - before == 1
    await set_policy(orch, {"routes": {"1": 100}, "shadow": {"version": "2", "percent": 100, "mirror_cached": True}})
    for _ in range(4):
        assert (await predict(orch, inputs={**ROW, "amount": 7.0}))["cached"] is True
    await orch.app.state.predictor.drain()
    assert mirrored() - before == 5


def _series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def test_metrics_do_not_grow_with_principals_and_usage_goes_to_the_admin_api(orch):
    """No principal in any label: 40 new principals add no series; their usage is in /admin/usage."""
    for p in ("warm-a", "warm-b"):
        await predict(orch, principal=p, inputs={**ROW, "amount": 8.0})
        await predict(orch, principal=p, inputs={**ROW, "amount": 8.0}, headers={"Cache-Control": "no-cache"})
    before = _series((await orch.get("/metrics")).text)
    principals = [f"user-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
    for p in principals:
        await predict(orch, principal=p, inputs={**ROW, "amount": 8.0})
        await predict(orch, principal=p, inputs={**ROW, "amount": 8.0}, headers={"Cache-Control": "no-cache"})
    text = (await orch.get("/metrics")).text
    assert _series(text) == before
    assert not [p for p in principals if p in text]
    usage = (await orch.get("/admin/usage", params={"days": 1, "limit": 1000})).json()["principals"]
    mine = {u["principal"]: u for u in usage if u["principal"] in principals}
    assert len(mine) == 40
    assert all((u["requests"], u["rows"], u["cached_rows"], u["models"]) == (2, 2, 1, {"fraud": 2})
               for u in mine.values())


@pytest.fixture
async def orch_internal(model_server, database_url, redis_url):
    app = orchestrator_app(_settings(model_server, database_url, redis_url, internal_token="s3cret"))
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://orch", timeout=30) as c):
        c.app = app
        yield c


async def test_erasure_removes_feedback_others_gave_about_the_subjects_predictions(orch_internal, redis_url):
    c = orch_internal
    subject, other = f"subject-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    theirs = await predict(c, principal=subject, inputs={**ROW, "amount": 31.0})
    mine = await predict(c, principal=other, inputs={**ROW, "amount": 32.0})
    for pid in (theirs["prediction_id"], mine["prediction_id"]):
        r = await c.post("/v1/feedback", json={"prediction_id": pid, "label": 1},  # an admin may label any
                         headers={"X-Principal": other, "X-Principal-Role": "admin"})
        assert r.status_code == 202, r.text
    token = {"X-Internal-Token": "s3cret"}
    exported = (await c.get(f"/internal/subjects/{subject}", headers=token)).json()
    assert [f["prediction_id"] for f in exported["feedback_log"]] == [theirs["prediction_id"]]
    assert exported["feedback_log"][0]["given_by_subject"] is False and exported["usage"][0]["rows"] == 1
    erased = (await c.request("DELETE", f"/internal/subjects/{subject}", headers=token)).json()
    assert erased["prediction_log"] == 1 and erased["feedback_log"] == 1 and erased["usage"] >= 2
    r = aioredis.from_url(redis_url)
    try:
        about = [f[b"prediction_id"].decode() for _, f in await r.xrange(FEEDBACK_STREAM)]
        logged = [f[b"principal"].decode() for _, f in await r.xrange(PREDICTION_STREAM)]
    finally:
        await r.aclose()
    assert theirs["prediction_id"] not in about and mine["prediction_id"] in about
    assert subject not in logged and other in logged
    usage = (await c.get("/admin/usage", params={"days": 1, "limit": 1000})).json()["principals"]
    assert subject not in {u["principal"] for u in usage}


async def test_a_re_registered_version_does_not_serve_the_old_cached_answers(models_dir, tmp_path, database_url,
                                                                              redis_url):
    """Version 1 retrained under the same label (other weights, so another manifest digest): the
    cache key names the version's content, so the old answers are not served again."""
    import json
    import shutil

    shutil.copytree(models_dir / "fraud", tmp_path / "fraud")
    server_app = model_app(ModelSettings(repository=tmp_path, ready_max_cpu_percent=100, internal_token="t0k"))
    with ServedApp(server_app) as server:
        app = orchestrator_app(_settings(server, database_url, redis_url, metadata_ttl_s=0))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://o") as c:
                row = {**ROW, "amount": 4321.0}
                old = await predict(c, inputs=row, version="1")
                assert (await predict(c, inputs=row, version="1"))["cached"] is True
                new_weights = await predict(c, inputs=row, version="2")
                repo = httpx.AsyncClient(base_url=f"{server.url}/v2/repository/models/fraud",
                                         headers={"X-Internal-Token": "t0k"}, timeout=60)
                assert (await repo.post("/unload")).status_code == 200
                v1, v2 = tmp_path / "fraud" / "1", tmp_path / "fraud" / "2"
                shutil.rmtree(v1)
                shutil.copytree(v2, v1)
                manifest = json.loads((v1 / "manifest.json").read_text())
                (v1 / "manifest.json").write_text(json.dumps({**manifest, "version": "1"}))
                assert (await repo.post("/load")).status_code == 200
                await repo.aclose()
                again = await predict(c, inputs=row, version="1")
    assert old["outputs"] != new_weights["outputs"]
    assert again["cached"] is False and again["outputs"] == new_weights["outputs"]


async def test_the_reported_pairs_under_a_tiny_policy_timeout(orch):
    """The issue's reproduction: timeout_s 0.0001 with a fallback, a routed and a pinned request at
    the same moment. Whatever the deadline cuts (connect or read; a loop that sees the answer first
    may even let one through), a pinned request never gets another version's answer, a fallback
    answer is never cached, a timeout is a 504 naming the deadline (never a 503 "unreachable"),
    and no replica leaves the pool."""
    from services.chassis.upstream import EJECTIONS

    await set_policy(orch, {"routes": {"1": 100}, "fallback": "2", "timeout_s": 0.0001})
    ejections = EJECTIONS.labels("model")._value.get()
    outcomes = set()
    for i in range(10):
        body = {"inputs": {**ROW, "amount": 1200.0 + i}}
        routed, pinned = await asyncio.gather(orch.post("/v1/predict/fraud", json=body),
                                              orch.post("/v1/predict/fraud", json={**body, "version": "1"}))
        assert routed.status_code == 200, routed.text
        r = routed.json()
        assert (r["version"], r.get("fallback", False)) in {("1", False), ("2", True)}
        assert not (r.get("fallback") and r["cached"])
        if pinned.status_code == 200:
            assert pinned.json()["version"] == "1" and "fallback" not in pinned.json()
        else:
            assert pinned.status_code == 504, pinned.text
            error = pinned.json()["error"]
            assert error["code"] == "deadline_exceeded" and "timeout_s of 0.0001 s" in error["message"]
        outcomes.add((r["version"], pinned.status_code))
    assert ("2", 504) in outcomes  # the deadline did cut, and the routed request fell back
    assert EJECTIONS.labels("model")._value.get() == ejections


def _command_names(packet) -> list[str]:
    """The command names in one packet redis-py writes (RESP arrays, a pipeline is several)."""
    raw = packet if isinstance(packet, (bytes, bytearray, memoryview)) else b"".join(bytes(p) for p in packet)
    parts, names, i = bytes(raw).split(b"\r\n"), [], 0
    while i < len(parts):
        if parts[i].startswith(b"*") and i + 2 < len(parts):
            names.append(parts[i + 2].decode().upper())
            i += 1 + 2 * int(parts[i][1:])
        else:
            i += 1
    return names


async def test_a_cache_hit_is_one_redis_round_trip_that_writes_its_log_entry(orch, redis_url, monkeypatch):
    """Issue 18: the hit's lookup, prediction log entry, feedback index and usage go in one EVALSHA,
    written before the answer leaves (nothing deferred to the background)."""
    from redis.asyncio.connection import Connection

    row = {**ROW, "amount": 1234.5}
    miss = await predict(orch, principal="rt-user", inputs=row)
    await predict(orch, principal="rt-user", inputs=row)  # the script is loaded now
    packets: list[list[str]] = []
    send = Connection.send_packed_command

    async def counting(self, command, check_health=True):
        packets.append(_command_names(command))
        return await send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    hit = await predict(orch, principal="rt-user", inputs=row)
    monkeypatch.setattr(Connection, "send_packed_command", send)
    assert hit["cached"] is True and hit["outputs"] == miss["outputs"]
    assert [p for p in packets if p not in (["PING"],)] == [["EVALSHA"]], packets

    r = aioredis.from_url(redis_url)
    try:
        entries = {f[b"id"].decode(): f for _, f in await r.xrevrange(PREDICTION_STREAM, count=50)}
        logged, first = entries[hit["prediction_id"]], entries[miss["prediction_id"]]
        assert logged[b"cached"] == b"1" and logged[b"principal"] == b"rt-user"
        assert logged[b"version"].decode() == hit["version"] and logged[b"input_hash"] == first[b"input_hash"]
        assert orjson.loads(logged[b"outputs"]) == [hit["outputs"]] == orjson.loads(first[b"outputs"])
        assert orjson.loads(logged[b"inputs"]) == orjson.loads(first[b"inputs"])
    finally:
        await r.aclose()
    fb = await orch.post("/v1/feedback", json={"prediction_id": hit["prediction_id"], "label": 0},
                         headers={"X-Principal": "rt-user"})
    assert fb.status_code == 202, fb.text  # the hit's feedback index was written by the script too
    usage = (await orch.get("/admin/usage", params={"days": 1, "limit": 1000})).json()["principals"]
    [mine] = [u for u in usage if u["principal"] == "rt-user"]
    assert (mine["requests"], mine["rows"], mine["cached_rows"]) == (3, 3, 2)


async def test_a_cached_entry_of_the_old_string_layout_is_a_miss_and_replaced(orch, redis_url):
    """Entries written before the hash layout (a JSON string) are recomputed, never a 500."""
    row = {**ROW, "amount": 4321.0}
    first = await predict(orch, inputs=row)
    r = aioredis.from_url(redis_url)
    try:
        entries = {f[b"id"].decode(): f for _, f in await r.xrevrange(PREDICTION_STREAM, count=50)}
        key = f"orchestrator:cache:fraud:{entries[first['prediction_id']][b'input_hash'].decode()}"
        assert await r.type(key) == b"hash"
        await r.set(key, orjson.dumps({"version": first["version"], "rows": [{"label": "stale"}]}), ex=60)
        again = await predict(orch, inputs=row)
        assert again["cached"] is False and again["outputs"] == first["outputs"]
        assert await r.type(key) == b"hash"
        assert (await predict(orch, inputs=row))["cached"] is True
    finally:
        await r.aclose()


async def test_embeddings_body_and_headers_are_kept_when_encoded_once(orch):
    """The embeddings answer is built by orjson in the handler (issue 18): same OpenAI shape, headers
    and values, hit or miss, floats or base64."""
    import base64
    import struct

    body = {"model": "minilm", "input": ["a red fox", f"run {uuid.uuid4().hex}"], "dimensions": 8}
    first, second = [await orch.post("/v1/embeddings", json=body, headers={"X-Principal": "emb"}) for _ in (0, 1)]
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["content-type"] == "application/json"
    assert first.headers["X-Prediction-Id"] != second.headers["X-Prediction-Id"]
    assert "orchestrator;dur=" in second.headers["Server-Timing"]
    doc = second.json()
    assert doc == first.json() and doc["object"] == "list" and doc["model"] == "minilm"
    assert [d["index"] for d in doc["data"]] == [0, 1] and all(len(d["embedding"]) == 8 for d in doc["data"])
    assert doc["usage"]["prompt_tokens"] == doc["usage"]["total_tokens"] > 0
    b64 = (await orch.post("/v1/embeddings", json={**body, "encoding_format": "base64"})).json()
    unpacked = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert unpacked == pytest.approx(doc["data"][0]["embedding"], rel=1e-6)
