"""Issue 16: the feature store's integrity at the edges, one test per observation.

Values at every boundary are checked before anything is written; the online store is brought in
line from the offline store; TTL changes take effect; counters mean what the schema says."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from services.features.dtypes import MAX_TTL_SECONDS
from services.features.online import OLDER, OnlineRow
from tests.integration.test_features_store import T0, iso, make_view, online, push, running


@pytest.fixture
async def fs(database_url, redis_url):
    async with running(database_url, redis_url) as pair:
        yield pair

END_OF_TIME = "9999-12-31T23:59:59.9999Z"


async def historical(client, entity, rows, features):
    r = await client.post("/v1/features/historical", json={"entity": entity, "rows": rows, "features": features})
    assert r.status_code == 200, r.text
    return r.json()["rows"]


async def offline_count(store, view) -> int:
    async with store.engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM features.offline_rows WHERE view = :v"),
                                   {"v": view})).scalar()


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70])
async def test_int_beyond_64_bits_is_422_naming_the_limit_and_writes_nothing(fs, value):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=0)
    r = await client.post("/v1/features/push", json={"view": view, "rows": [
        {"user_id": "u1", "event_time": iso(T0), "n": value, "score": 1.0}]})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert "rows[0].n" in err["message"] and "64-bit" in err["details"][0]["msg"]
    assert await offline_count(store, view) == 0
    [row] = await historical(client, ent, [{"id": "u1", "timestamp": iso(T0)}], [view])
    assert row["statuses"]["n"] == "missing"
    # The bounds themselves are fine.
    ok = await push(client, view, [{"user_id": "u1", "event_time": iso(T0), "n": 2**63 - 1, "score": 1.0},
                                   {"user_id": "u2", "event_time": iso(T0), "n": -(2**63), "score": 1.0}])
    assert ok["offline_written"] == 2
    got = await online(client, ent, ["u1", "u2"], [f"{view}:n"])
    assert (got["u1"]["values"]["n"], got["u2"]["values"]["n"]) == (2**63 - 1, -(2**63))


async def test_a_stored_row_out_of_bounds_never_blocks_materialisation(fs):
    """Rows written before the bounds existed: skipped and counted, the view's other rows and the
    views after it materialised, the incremental position advanced."""
    client, store = fs
    ent, bad_view = await make_view(client, ttl_seconds=0)
    _, good_view = await make_view(client, ttl_seconds=0, entity=ent)
    await push(client, bad_view, [{"user_id": "ok", "event_time": iso(T0), "n": 1, "score": 1.0}], to="offline")
    await push(client, good_view, [{"user_id": "ok", "event_time": iso(T0), "n": 2, "score": 2.0}], to="offline")
    async with store.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO features.offline_rows (view, entity_key, event_time, values, source) "
            "VALUES (:v, 'huge', :t, CAST(:vals AS jsonb), 'legacy')"),
            {"v": bad_view, "t": T0, "vals": f'{{"n": {2**70}, "score": 1.0}}'})
    r = await client.post("/admin/features/materialize", json={"views": [bad_view, good_view]})
    assert r.status_code == 200, r.text
    bad, good = r.json()["results"]
    assert (bad["entities"], bad["written"], bad["invalid"], bad["error"]) == (2, 1, 1, None)
    assert (good["written"], good["error"]) == (1, None)
    got = await online(client, ent, ["ok", "huge"], [f"{bad_view}:n"])
    assert got["ok"]["values"]["n"] == 1 and got["huge"]["statuses"]["n"] == "missing"
    again = (await client.post("/admin/features/materialize", json={"views": [bad_view]})).json()["results"][0]
    assert again["entities"] == 0  # the incremental position moved past the bad row


async def test_large_floats_come_back_as_floats_from_both_stores(fs):
    """Postgres prints a JSONB numeric without an exponent: 1e20 must not come back as an int."""
    client, _ = fs
    ent, view = await make_view(client, ttl_seconds=0)
    await push(client, view, [{"user_id": "u1", "event_time": iso(T0), "n": 1, "score": 1e20},
                              {"user_id": "u2", "event_time": iso(T0), "n": 1, "score": 1.7976931348623157e308}])
    got = await online(client, ent, ["u1", "u2"], [f"{view}:score"])
    assert got["u1"]["values"]["score"] == 1e20 and got["u2"]["values"]["score"] == 1.7976931348623157e308
    rows = await historical(client, ent, [{"id": "u1", "timestamp": iso(T0)}], [f"{view}:score"])
    assert rows[0]["values"]["score"] == 1e20 and isinstance(rows[0]["values"]["score"], float)


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("to", ["online_and_offline", "online"])
async def test_event_time_at_the_end_of_year_9999_is_truncated_not_rounded(fs, to):
    client, _ = fs
    ent, view = await make_view(client, ttl_seconds=0)
    r = await push(client, view, [{"user_id": "u1", "event_time": END_OF_TIME, "n": 1, "score": 1.0},
                                  {"user_id": "u2", "event_time": "2025-12-31T23:59:59.9999Z", "n": 2,
                                   "score": 2.0}], to=to)
    assert r["online_written"] == 2
    got = await online(client, ent, ["u1", "u2"], [view])
    assert datetime.fromisoformat(got["u1"]["event_times"]["n"]) == datetime(9999, 12, 31, 23, 59, 59, 999000,
                                                                            tzinfo=UTC)
    assert datetime.fromisoformat(got["u2"]["event_times"]["n"]).year == 2025  # never rounded into 2026
    if to == "online_and_offline":
        [row] = await historical(client, ent, [{"id": "u1", "timestamp": END_OF_TIME}], [view])
        assert row["values"] == {"n": 1, "score": 1.0}


async def test_event_times_beyond_the_range_are_422(fs):
    client, store = fs
    _, view = await make_view(client)
    for when in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:30:00+01:00", "0001-01-01T00:00:00Z", 1e20, -1e20,
                 "10000-01-01T00:00:00Z"):
        r = await client.post("/v1/features/push", json={"view": view, "rows": [
            {"user_id": "u1", "event_time": when, "n": 1, "score": 1.0}]})
        assert r.status_code == 422 and "rows[0].event_time" in r.json()["error"]["message"], (when, r.text)
    assert await offline_count(store, view) == 0
    ok = await push(client, view, [{"user_id": "u1", "event_time": "0001-01-01T00:00:00.001Z", "n": 1, "score": 1.0}])
    assert ok["offline_written"] == 1


# 3 -------------------------------------------------------------------------------------------
async def test_ttl_has_an_upper_bound(fs):
    client, _ = fs
    ent, view = await make_view(client)
    for spec in ({"ttl_seconds": 10**12}, {"ttl": "99999999w"}, {"ttl_seconds": MAX_TTL_SECONDS + 1},
                 {"ttl_seconds": -1}):
        doc = {"feature_views": [{"name": view, "entity": ent, "features": [{"name": "n", "dtype": "int"}], **spec}]}
        r = await client.post("/admin/features/apply", json=doc)
        assert r.status_code == 422 and "ttl" in r.text, (spec, r.text)
        assert r.json()["error"]["code"] == "validation_error"
    doc["feature_views"][0] = {**doc["feature_views"][0], "ttl_seconds": MAX_TTL_SECONDS}
    assert (await client.post("/admin/features/apply", json=doc)).status_code == 200


# 4 -------------------------------------------------------------------------------------------
async def test_a_ttl_change_applies_to_values_already_online(fs):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=60)
    now = datetime.now(UTC)
    await push(client, view, [{"user_id": "u1", "event_time": iso(now), "n": 1, "score": 1.0},
                              {"user_id": "old", "event_time": iso(now - timedelta(minutes=5)), "n": 1,
                               "score": 1.0}])
    redis, key = store.online_store.redis, store.online_store.key(view, "u1")
    grace_ms = store.online_store.grace_ms
    assert 0 < await redis.pttl(key) <= 60_000 + grace_ms
    spec = {"name": view, "entity": ent, "features": [{"name": "n", "dtype": "int"},
                                                      {"name": "score", "dtype": "float"}]}
    # Lower to 0 ("never"): keys no longer expire.
    assert (await client.put(f"/admin/features/views/{view}", json={**spec, "ttl_seconds": 0})).status_code == 200
    assert await redis.pttl(key) == -1
    got = await online(client, ent, ["old"], [f"{view}:n"])
    assert got["old"]["statuses"]["n"] == "present"
    # Raise to a day: keys live a day past their event time, not 60 s.
    assert (await client.put(f"/admin/features/views/{view}", json={**spec, "ttl_seconds": 86400})).status_code == 200
    assert await redis.pttl(key) > 86_000_000
    # Lower to 60 s again: the old value reads as expired at once, and its key expires soon.
    assert (await client.put(f"/admin/features/views/{view}", json={**spec, "ttl_seconds": 60})).status_code == 200
    got = await online(client, ent, ["old"], [f"{view}:n"])
    assert got["old"]["statuses"]["n"] == "expired"
    assert 0 < await redis.pttl(store.online_store.key(view, "old")) <= 60_000 + grace_ms


async def test_rematerialising_repairs_an_online_expiry(fs):
    """An identical write refreshes the expiry instead of returning before it."""
    client, store = fs
    _, view = await make_view(client, ttl_seconds=0)
    now = datetime.now(UTC)
    await push(client, view, [{"user_id": "u1", "event_time": iso(now), "n": 1, "score": 1.0}])
    redis, key = store.online_store.redis, store.online_store.key(view, "u1")
    await redis.pexpire(key, 5_000)  # an expiry from an earlier TTL
    [result] = await store.materialize([view], start=now - timedelta(days=1))
    assert (result["written"], result["unchanged"]) == (0, 1)
    assert await redis.pttl(key) == -1


async def test_raising_a_ttl_brings_back_values_dropped_under_the_old_one(fs):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=3600)
    now = datetime.now(UTC)
    await push(client, view, [{"user_id": "u1", "event_time": iso(now - timedelta(hours=2)), "n": 1,
                               "score": 1.0}], to="offline")
    [first] = await store.materialize([view])
    assert first["entities"] == 0  # past the TTL: nothing to serve
    spec = {"name": view, "entity": ent, "ttl_seconds": 86400,
            "features": [{"name": "n", "dtype": "int"}, {"name": "score", "dtype": "float"}]}
    assert (await client.put(f"/admin/features/views/{view}", json=spec)).status_code == 200
    [second] = await store.materialize([view])  # incremental: starts over after the raise
    assert second["written"] == 1
    got = await online(client, ent, ["u1"], [f"{view}:n"])
    assert got["u1"]["statuses"]["n"] == "present"


# 5 -------------------------------------------------------------------------------------------
async def test_a_failed_online_write_is_repaired_from_the_offline_store(fs, monkeypatch):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=0)
    now = datetime.now(UTC).replace(microsecond=0)
    real_write = store.online_store.write

    async def redis_drops(*args, **kwargs):
        raise ConnectionError("Redis went away mid-push")

    monkeypatch.setattr(store.online_store, "write", redis_drops)
    r = await client.post("/v1/features/push", json={"view": view, "rows": [
        {"user_id": "u1", "event_time": iso(now), "n": 2, "score": 2.0}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "dependency_unavailable"
    assert await offline_count(store, view) == 1  # the record is committed
    monkeypatch.setattr(store.online_store, "write", real_write)
    # The next push of that key, even of an older event, brings the key in line with the offline store.
    r = await push(client, view, [{"user_id": "u1", "event_time": iso(now - timedelta(hours=1)), "n": 1,
                                   "score": 1.0}])
    assert (r["online_written"], r["online_skipped_older"]) == (0, 1)
    got = await online(client, ent, ["u1"], [view])
    assert got["u1"]["values"] == {"n": 2, "score": 2.0}
    assert datetime.fromisoformat(got["u1"]["event_times"]["n"]) == now


async def test_ties_at_one_event_time_go_to_the_row_committed_last_in_both_stores(fs):
    client, store = fs
    ent, view = await make_view(client, ttl_seconds=0)
    await push(client, view, [{"user_id": "u1", "event_time": iso(T0), "n": 1, "score": 1.0}])
    await push(client, view, [{"user_id": "u1", "event_time": iso(T0), "n": 2, "score": 2.0}])  # a correction
    async with store.engine.connect() as conn:
        first = (await conn.execute(text(
            "SELECT entity_key, event_time, created_at, id, values FROM features.offline_rows "
            "WHERE view = :v ORDER BY id LIMIT 1"), {"v": view})).one()
    from services.features.offline import online_row

    # A materialisation that read the first row before the correction committed writes it late.
    stale: OnlineRow = online_row(first)
    counts = await store.online_store.write(view, 0, [stale], stale.event_ms)
    assert counts.results == [OLDER]
    got = await online(client, ent, ["u1"], [view])
    assert got["u1"]["values"] == {"n": 2, "score": 2.0}
    [row] = await historical(client, ent, [{"id": "u1", "timestamp": iso(T0)}], [view])
    assert row["values"] == {"n": 2, "score": 2.0}


# 6 -------------------------------------------------------------------------------------------
async def test_an_identical_rewrite_is_not_counted_as_older(fs):
    client, _ = fs
    _, view = await make_view(client, ttl_seconds=0)
    row = {"user_id": "u1", "event_time": iso(T0), "n": 1, "score": 1.0}
    first = await push(client, view, [row])
    again = await push(client, view, [row])
    assert (first["online_written"], first["online_unchanged"], first["online_skipped_older"]) == (1, 0, 0)
    assert (again["online_written"], again["online_unchanged"], again["online_skipped_older"]) == (0, 1, 0)
    older = await push(client, view, [{**row, "event_time": iso(T0 - timedelta(days=1))}])
    assert (older["online_written"], older["online_unchanged"], older["online_skipped_older"]) == (0, 0, 1)
    # Two rows of one key in one push: the last one is the newest, the first one is "older".
    both = await push(client, view, [{**row, "n": 5}, {**row, "n": 6}])
    assert (both["online_written"], both["online_skipped_older"]) == (1, 1)


async def test_a_ttl_change_made_elsewhere_applies_online(fs):
    """`aistack features apply` (Postgres only) or another replica changed the TTL: the store
    that loads the new registry re-expires the keys."""
    from services.features.registry import RegistryStore
    from services.features.schemas import FeatureViewSpec

    client, store = fs
    ent, view = await make_view(client, ttl_seconds=60)
    await push(client, view, [{"user_id": "u1", "event_time": iso(datetime.now(UTC)), "n": 1, "score": 1.0}])
    redis, key = store.online_store.redis, store.online_store.key(view, "u1")
    assert await redis.pttl(key) > 0
    elsewhere = RegistryStore(store.engine)
    await elsewhere.put("feature_view", FeatureViewSpec(name=view, entity=ent, ttl_seconds=0, features=[
        {"name": "n", "dtype": "int"}, {"name": "score", "dtype": "float"}]))
    await store.registry(fresh=True)  # what the next request does within FEATURES_REGISTRY_CACHE_S
    assert await redis.pttl(key) == -1
