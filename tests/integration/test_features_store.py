"""Feature store against real Postgres and Redis: registry, push, online reads, point-in-time
retrieval, materialisation, the demo seed. Each test uses its own view names and Redis prefix."""
from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.demo.synthetic import CUSTOMER_FEATURES, customer_profiles
from services.features.app import create_app
from services.features.settings import FeaturesSettings

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


@asynccontextmanager
async def running(database_url, redis_url, **overrides):
    options = {"redis_prefix": f"features:t{secrets.token_hex(4)}:", "seed_demo": False,
               "freshness_interval_s": 0, **overrides}
    settings = FeaturesSettings(database_url=database_url, redis_url=redis_url, **options)
    app = create_app(settings)
    transport = httpx.ASGITransport(app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://features") as client:
        yield client, app.state.store


@pytest.fixture
async def fs(database_url, redis_url):
    async with running(database_url, redis_url) as pair:
        yield pair


def names() -> tuple[str, str]:
    suffix = secrets.token_hex(4)
    return f"ent_{suffix}", f"view_{suffix}"


async def make_view(client, ttl_seconds=3600, features=None, entity=None, view=None):
    ent, v = names()
    ent, v = entity or ent, view or v
    doc = {"entities": [{"name": ent, "join_key": "user_id", "dtype": "string"}],
           "feature_views": [{"name": v, "entity": ent, "ttl_seconds": ttl_seconds,
                              "features": features or [{"name": "n", "dtype": "int"},
                                                       {"name": "score", "dtype": "float"}]}]}
    r = await client.post("/admin/features/apply", json=doc)
    assert r.status_code == 200, r.text
    return ent, v


async def push(client, view, rows, to="online_and_offline"):
    r = await client.post("/v1/features/push", json={"view": view, "rows": rows, "to": to})
    assert r.status_code == 200, r.text
    return r.json()


async def online(client, entity, ids, features):
    r = await client.post("/v1/features/online", json={"entity": entity, "ids": ids, "features": features})
    assert r.status_code == 200, r.text
    return {res["id"]: res for res in r.json()["results"]}


# -- registry ----------------------------------------------------------------------------------
async def test_apply_is_idempotent_and_versioned(fs):
    client, _ = fs
    ent, view = names()
    doc = {"entities": [{"name": ent, "join_key": "user_id", "dtype": "string", "description": "a user"}],
           "feature_views": [{"name": view, "entity": ent, "ttl": "1h", "owner": "me", "tags": {"team": "x"},
                              "features": [{"name": "n", "dtype": "int"}]}]}
    first = (await client.post("/admin/features/apply", json=doc)).json()
    assert [(c["kind"], c["action"], c["version"]) for c in first["changes"]] == \
        [("entity", "created", 1), ("feature_view", "created", 1)]
    second = (await client.post("/admin/features/apply", json=doc)).json()
    assert [c["action"] for c in second["changes"]] == ["unchanged", "unchanged"]

    doc["feature_views"][0]["ttl"] = "2h"
    doc["feature_views"][0]["features"].append({"name": "m", "dtype": "float"})
    dry = (await client.post("/admin/features/apply", json={**doc, "dry_run": True})).json()
    assert dry["changes"][1]["action"] == "updated"
    assert (await client.get(f"/admin/features/views/{view}")).json()["ttl_seconds"] == 3600  # dry run
    third = (await client.post("/admin/features/apply", json=doc)).json()
    change = third["changes"][1]
    assert (change["action"], change["version"]) == ("updated", 2)
    assert change["diff"]["ttl_seconds"] == [3600, 7200] and change["diff"]["features"]["added"] == ["m"]
    got = (await client.get(f"/admin/features/views/{view}")).json()
    assert got["version"] == 2 and got["tags"] == {"team": "x"} and got["owner"] == "me"
    versions = (await client.get(f"/admin/features/views/{view}/versions")).json()
    assert [(v["version"], v["action"]) for v in versions] == [(1, "created"), (2, "updated")]
    assert versions[0]["spec"]["ttl_seconds"] == 3600


async def test_admin_crud(fs):
    client, _ = fs
    ent, view = names()
    r = await client.post("/admin/features/entities", json={"name": ent, "join_key": "k"})
    assert r.status_code == 201 and r.json()["action"] == "created"
    assert (await client.post("/admin/features/entities", json={"name": ent, "join_key": "k"})).status_code == 409
    bad = await client.post("/admin/features/views", json={"name": view, "entity": "nope_" + ent,
                                                           "features": [{"name": "a"}]})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_spec"
    r = await client.post("/admin/features/views", json={"name": view, "entity": ent, "features": [{"name": "a"}]})
    assert r.status_code == 201
    assert view in [v["name"] for v in (await client.get("/admin/features/views")).json()]
    r = await client.put(f"/admin/features/views/{view}", json={"name": view, "entity": ent, "ttl_seconds": 5,
                                                                "features": [{"name": "a"}]})
    assert r.json()["version"] == 2
    in_use = await client.delete(f"/admin/features/entities/{ent}")
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "entity_in_use"
    await push(client, view, [{"k": "1", "a": 1.0}])
    assert (await client.delete(f"/admin/features/views/{view}")).json()["action"] == "deleted"
    assert (await client.get(f"/admin/features/views/{view}")).status_code == 404
    assert (await client.delete(f"/admin/features/entities/{ent}")).status_code == 200
    missing = await client.get(f"/admin/features/entities/{ent}")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"code", "message", "details"}


# -- push and online ---------------------------------------------------------------------------
async def test_push_wrong_type_is_422_naming_the_field(fs):
    client, _ = fs
    ent, view = await make_view(client)
    r = await client.post("/v1/features/push", json={"view": view, "rows": [
        {"user_id": "u1", "event_time": iso(T0), "n": 1, "score": 0.5},
        {"user_id": "u2", "event_time": iso(T0), "n": "three", "score": 0.5}]})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "validation_error" and "rows[1].n" in err["message"]
    assert err["details"][0]["loc"] == ["rows", 1, "n"] and "expected int" in err["details"][0]["msg"]
    # Nothing of a rejected push is written.
    got = await online(client, ent, ["u1"], [view])
    assert got["u1"]["statuses"] == {"n": "missing", "score": "missing"}
    for row, field in [({"user_id": "u1", "n": 1}, "score"), ({"user_id": "u1", "n": 1, "score": 1, "x": 2}, "x"),
                       ({"n": 1, "score": 1.0}, "user_id")]:
        r = await client.post("/v1/features/push", json={"view": view, "rows": [row]})
        assert r.status_code == 422 and f"rows[0].{field}" in r.json()["error"]["message"], r.text


async def test_older_event_never_overwrites_newer(fs):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=0)
    now = datetime.now(UTC).replace(microsecond=0)  # the stores keep milliseconds
    newer = await push(client, view, [{"user_id": "u1", "event_time": iso(now), "n": 2, "score": 2.0}])
    assert newer["online_written"] == 1
    older = await push(client, view, [{"user_id": "u1", "event_time": iso(now - timedelta(hours=1)),
                                       "n": 1, "score": 1.0}])
    assert (older["online_written"], older["online_skipped_older"], older["offline_written"]) == (0, 1, 1)
    got = (await online(client, ent, ["u1"], [f"{view}:n", f"{view}:score"]))["u1"]
    assert got["values"] == {"n": 2, "score": 2.0} and got["statuses"]["n"] == "present"
    assert datetime.fromisoformat(got["event_times"]["n"]) == now
    # Materialising the offline history (which holds both) keeps the newer value too.
    await store.materialize([view], start=now - timedelta(days=1))
    got = (await online(client, ent, ["u1"], [view]))["u1"]
    assert got["values"] == {"n": 2, "score": 2.0}


async def test_ttl_expired_and_missing(fs):
    client, _ = fs
    ent, view = await make_view(client, ttl_seconds=3600)
    now = datetime.now(UTC)
    await push(client, view, [
        {"user_id": "fresh", "event_time": iso(now - timedelta(minutes=5)), "n": 1, "score": 1.0},
        {"user_id": "stale", "event_time": iso(now - timedelta(hours=2)), "n": 2, "score": 2.0},
        {"user_id": "nulls", "event_time": iso(now), "n": None, "score": 3.0},
    ])
    got = await online(client, ent, ["fresh", "stale", "never", "nulls"], [view])
    assert got["fresh"]["statuses"] == {"n": "present", "score": "present"}
    assert got["fresh"]["values"] == {"n": 1, "score": 1.0}
    assert got["stale"]["statuses"] == {"n": "expired", "score": "expired"}
    assert got["stale"]["values"] == {"n": None, "score": None} and got["stale"]["event_times"]["n"] is not None
    assert got["never"]["statuses"] == {"n": "missing", "score": "missing"}
    assert got["never"]["event_times"] == {"n": None, "score": None}
    assert got["nulls"]["statuses"] == {"n": "missing", "score": "present"}
    metrics = (await client.get("/metrics")).text
    assert "aistack_features_online_read_seconds_count" in metrics
    assert f'aistack_features_online_values_total{{status="expired",view="{view}"}} 2.0' in metrics


async def test_online_read_across_views(fs):
    client, _ = fs
    ent, v1 = await make_view(client, ttl_seconds=0)
    _, v2 = await make_view(client, ttl_seconds=0, entity=ent, features=[{"name": "n", "dtype": "int"},
                                                                         {"name": "tag", "dtype": "string"}])
    await push(client, v1, [{"user_id": "u1", "n": 1, "score": 0.5}])
    await push(client, v2, [{"user_id": "u1", "n": 7, "tag": "gold"}])
    r = await client.post("/v1/features/online", json={"entity": ent, "ids": ["u1", "u2"],
                                                       "features": [f"{v1}:n", f"{v2}:n"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "ambiguous_feature_names"
    r = await client.post("/v1/features/online", json={"entity": ent, "ids": ["u1", "u2"], "full_names": True,
                                                       "features": [f"{v1}:n", f"{v2}:n", f"{v2}:tag"]})
    body = r.json()
    assert body["features"] == [f"{v1}:n", f"{v2}:n", f"{v2}:tag"] and body["join_key"] == "user_id"
    assert [res["id"] for res in body["results"]] == ["u1", "u2"]
    assert body["results"][0]["values"] == {f"{v1}:n": 1, f"{v2}:n": 7, f"{v2}:tag": "gold"}


# -- point in time -----------------------------------------------------------------------------
async def test_point_in_time_correctness(fs):
    client, store = fs
    ent, daily = await make_view(client, ttl_seconds=86400)  # values live one day
    _, forever = await make_view(client, ttl_seconds=0, entity=ent,
                                 features=[{"name": "level", "dtype": "string"}])
    h = timedelta(hours=1)
    await push(client, daily, [
        {"user_id": "a", "event_time": iso(T0), "n": 1, "score": 1.0},
        {"user_id": "a", "event_time": iso(T0 + h), "n": 2, "score": 2.0},
        {"user_id": "a", "event_time": iso(T0 + 3 * h), "n": 3, "score": 3.0},
        {"user_id": "b", "event_time": iso(T0), "n": 10, "score": 10.0},
    ], to="offline")
    # A correction of b at the same event time, written later: it wins.
    await push(client, daily, [{"user_id": "b", "event_time": iso(T0), "n": 11, "score": 11.0}], to="offline")
    await push(client, forever, [{"user_id": "a", "event_time": iso(T0 - 30 * 24 * h), "level": "silver"},
                                 {"user_id": "a", "event_time": iso(T0 + 2 * h), "level": "gold"}], to="offline")
    day, sec = timedelta(days=1), timedelta(seconds=1)
    cases = [  # (id, timestamp) -> expected n, daily status, level
        ("a", T0 - sec, None, "missing", "silver"),
        ("a", T0, 1, "present", "silver"),  # event_time <= ts is inclusive
        ("a", T0 + 2 * h - sec, 2, "present", "silver"),
        ("a", T0 + 2 * h, 2, "present", "gold"),
        ("a", T0 + 3 * h - sec, 2, "present", "gold"),  # the 3 is in the future: never seen
        ("a", T0 + 3 * h + day, 3, "present", "gold"),  # exactly at the TTL: still valid
        ("a", T0 + 3 * h + day + sec, None, "expired", "gold"),  # past the TTL; no TTL on `forever`
        ("b", T0 + h, 11, "present", None),
        ("zzz", T0 + h, None, "missing", None),
    ]
    r = await client.post("/v1/features/historical", json={
        "entity": ent, "features": [f"{daily}:n", f"{forever}:level"],
        "rows": [{"id": i, "timestamp": iso(ts)} for i, ts, *_ in cases]})
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    assert len(rows) == len(cases)
    for row, (i, ts, n, status, level) in zip(rows, cases):
        assert row["id"] == i
        assert (row["values"]["n"], row["statuses"]["n"], row["values"]["level"]) == (n, status, level), (i, ts)
        if row["event_times"]["n"] is not None:
            assert datetime.fromisoformat(row["event_times"]["n"]) <= ts
    # The same through the framework-free facade (what the CLI uses).
    out = await store.historical(ent, [{"id": "a", "timestamp": T0 + 2 * h}], [daily])
    assert out["rows"][0]["values"] == {"n": 2, "score": 2.0}


# -- materialisation ---------------------------------------------------------------------------
async def test_materialize_incremental_and_idempotent(fs):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=0)
    now = datetime.now(UTC)
    await push(client, view, [
        {"user_id": u, "event_time": iso(now - timedelta(hours=k)), "n": 10 * i + k, "score": float(k)}
        for i, u in enumerate(["u1", "u2", "u3"]) for k in (3, 2, 1)], to="offline")
    got = await online(client, ent, ["u1"], [view])
    assert got["u1"]["statuses"]["n"] == "missing"

    first = (await client.post("/admin/features/materialize", json={"views": [view]})).json()["results"][0]
    assert (first["incremental"], first["entities"], first["written"]) == (True, 3, 3)
    got = await online(client, ent, ["u1", "u2", "u3"], [view])
    assert [got[u]["values"]["n"] for u in ("u1", "u2", "u3")] == [1, 11, 21]  # newest per entity

    again = (await client.post("/admin/features/materialize", json={"views": [view]})).json()["results"][0]
    assert (again["entities"], again["written"]) == (0, 0)  # remembers how far it got
    window = {"views": [view], "start": iso(now - timedelta(days=1)), "end": iso(now + timedelta(minutes=1))}
    rerun = (await client.post("/admin/features/materialize", json=window)).json()["results"][0]
    assert (rerun["incremental"], rerun["entities"], rerun["written"]) == (False, 3, 0)  # idempotent

    # New data: only that entity is picked up; a late (older) row is seen but never overwrites.
    await push(client, view, [{"user_id": "u2", "event_time": iso(now), "n": 99, "score": 9.0},
                              {"user_id": "u3", "event_time": iso(now - timedelta(hours=5)), "n": -1,
                               "score": -1.0}], to="offline")
    inc = (await store.materialize([view]))[0]
    assert (inc["entities"], inc["written"]) == (2, 1)
    got = await online(client, ent, ["u1", "u2", "u3"], [view])
    assert [got[u]["values"]["n"] for u in ("u1", "u2", "u3")] == [1, 99, 21]
    # An explicit older window copies that window's newest values, which are older: nothing changes.
    old = (await store.materialize([view], start=now - timedelta(hours=4), end=now - timedelta(hours=2, minutes=30)))[0]
    assert (old["entities"], old["written"]) == (3, 0)

    stats = (await client.get("/admin/features/stats")).json()
    mine = next(v for v in stats["views"] if v["view"] == view)
    assert mine["offline_rows"] == 11 and mine["materialized_to"] is not None
    assert mine["freshness_seconds"] is not None and mine["last_materialization"]["incremental"] is False


async def test_materialize_skips_values_past_ttl(fs):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=3600)
    now = datetime.now(UTC)
    await push(client, view, [{"user_id": "old", "event_time": iso(now - timedelta(hours=3)), "n": 1, "score": 1.0},
                              {"user_id": "new", "event_time": iso(now - timedelta(minutes=1)), "n": 2, "score": 2.0}],
               to="offline")
    (res,) = await store.materialize([view])
    assert (res["entities"], res["written"]) == (1, 1)
    got = await online(client, ent, ["old", "new"], [f"{view}:n"])
    assert got["old"]["statuses"]["n"] == "missing" and got["new"]["values"]["n"] == 2


# -- the demo ----------------------------------------------------------------------------------
async def test_demo_seed_present_and_idempotent(database_url, redis_url):
    async with running(database_url, redis_url, seed_demo=True) as (client, store):
        # Two more replicas seeding at once next to this one: still one history.
        await asyncio.gather(store.seed_demo(), store.seed_demo())
        r = await client.post("/v1/features/online", json={
            "entity": "customer", "ids": ["C0001", "C1000", "C5000"],
            "features": [f"customer_transactions:{f}" for f in CUSTOMER_FEATURES]})
        body = r.json()
        assert body["features"] == CUSTOMER_FEATURES
        first, last, unknown = body["results"]
        assert set(first["statuses"].values()) == {"present"} and set(last["statuses"].values()) == {"present"}
        assert set(unknown["statuses"].values()) == {"missing"}
        profile = customer_profiles(1000)
        for f in CUSTOMER_FEATURES:
            assert first["values"][f] == pytest.approx(float(profile[f][0]), abs=1e-3)
        stats = (await client.get("/admin/features/stats")).json()
        demo = next(v for v in stats["views"] if v["view"] == "customer_transactions")
        assert demo["offline_rows"] == 4000
        hist = await client.post("/v1/features/historical", json={
            "entity": "customer", "features": ["customer_transactions"],
            "rows": [{"id": "C0001", "timestamp": iso(datetime.now(UTC))}]})
        assert set(hist.json()["rows"][0]["statuses"].values()) == {"present"}
    # A restart changes nothing.
    async with running(database_url, redis_url, seed_demo=True) as (client, store):
        stats = (await client.get("/admin/features/stats")).json()
        assert next(v for v in stats["views"] if v["view"] == "customer_transactions")["offline_rows"] == 4000
