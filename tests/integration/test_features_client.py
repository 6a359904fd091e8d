"""The feature store's published contract (services/features/client.py): one client for online,
historical and materialise, async and sync, one error mapping, and light enough for every image."""
from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest

from services.features.client import (
    FeatureStoreClient,
    FeatureStoreError,
    SyncFeatureStoreClient,
    present_values,
)
from tests.conftest import ServedApp, free_port
from tests.integration.test_features_store import T0, iso, make_view, push, running


@pytest.fixture
async def fs(database_url, redis_url):
    async with running(database_url, redis_url) as pair:
        yield pair


async def test_async_client_online_historical_materialize(fs):
    client, _ = fs
    ent, view = await make_view(client, ttl_seconds=0)
    await push(client, view, [{"user_id": "u1", "event_time": iso(T0), "n": 1, "score": 0.5}], to="offline")
    features = FeatureStoreClient(client)
    [result] = await features.materialize([view], start=datetime(2020, 1, 1, tzinfo=UTC))
    assert (result["view"], result["written"]) == (view, 1)
    got = await features.online(ent, ["u1", "u2"], [view])
    assert present_values(got["u1"]) == {"n": 1, "score": 0.5}
    assert present_values(got["u2"]) == {"n": None, "score": None}
    rows = await features.historical(ent, [("u1", T0), ("u1", "2020-01-01T00:00:00Z")] * 3, [view], chunk=4)
    assert [present_values(r)["n"] for r in rows] == [1, None] * 3


async def test_errors_map_to_one_shape(fs):
    client, _ = fs
    features = FeatureStoreClient(client)
    with pytest.raises(FeatureStoreError) as bad:
        await features.online("no_such_entity", ["x"], ["no_such_view"])
    assert (bad.value.status, bad.value.retryable) == (422, False)
    assert bad.value.details["error"]["code"] == "entity_not_found"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(FeatureStoreError) as down:
            await FeatureStoreClient(nowhere).online("customer", ["x"], ["v"])
    assert (down.value.status, down.value.retryable, down.value.headers) == (503, True, {"Retry-After": "2"})


async def test_sync_client_against_a_served_store(database_url, redis_url):
    from services.features.app import create_app
    from services.features.settings import FeaturesSettings

    settings = FeaturesSettings(database_url=database_url, redis_url=redis_url, seed_demo=False,
                                freshness_interval_s=0, redis_prefix="features:tsync:")
    with ServedApp(create_app(settings)) as served:
        async with httpx.AsyncClient(base_url=served.url) as http:
            ent, view = await make_view(http, ttl_seconds=0)
            await push(http, view, [{"user_id": "u1", "event_time": iso(T0), "n": 3, "score": 1.5}])

        def sync_calls():
            with SyncFeatureStoreClient(served.url) as features:
                rows = features.historical(ent, [("u1", T0)], [f"{view}:n"])
                online = features.online(ent, ["u1"], [view])
                return rows, online, features.materialize([view])

        import asyncio

        rows, online, results = await asyncio.to_thread(sync_calls)
    assert present_values(rows[0]) == {"n": 3} and present_values(online["u1"])["score"] == 1.5
    assert results[0]["view"] == view


def test_the_contract_imports_no_heavy_dependency():
    code = ("import sys, services.features.client; "
            "heavy = {'pandas', 'numpy', 'torch', 'sqlalchemy', 'redis'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_the_pipeline_materialises_through_the_contract(database_url, redis_url):
    from services.features.app import create_app
    from services.features.settings import FeaturesSettings
    from services.pipeline.celery_app import create_celery
    from services.pipeline.settings import PipelineSettings

    settings = FeaturesSettings(database_url=database_url, redis_url=redis_url, seed_demo=False,
                                freshness_interval_s=0, redis_prefix="features:ttask:")
    with ServedApp(create_app(settings)) as served:
        async with httpx.AsyncClient(base_url=served.url) as http:
            _, view = await make_view(http, ttl_seconds=0)
            await push(http, view, [{"user_id": "u1", "event_time": iso(T0), "n": 3, "score": 1.5}], to="offline")
        # The pipeline's own Celery app, current in the thread that runs the task (other tests make
        # other apps current, and Celery's current app is per thread).
        app = create_celery(PipelineSettings(redis_url=redis_url, features_url=served.url, http_timeout_s=5.0))
        app.loader.import_default_modules()  # what a worker does at start: registers the tasks

        def run(views):
            app.set_current()
            return app.tasks["pipeline.materialize_features"].apply(kwargs={"views": views})

        import asyncio

        ok = (await asyncio.to_thread(run, [view])).get()
        bad = await asyncio.to_thread(run, ["nope"])
    assert ok["results"][0]["view"] == view and ok["results"][0]["written"] == 1
    assert isinstance(bad.result, FeatureStoreError) and not bad.result.retryable
