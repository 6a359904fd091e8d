"""Property-based tests of the feature store's typed fields (issue 16), against real Postgres and Redis.

Every typed field of push, online, historical and apply gets values at and beyond each boundary
of its type (64-bit ints, doubles, strings with NUL or lone surrogates, times at year 1 and year
9999, huge and tiny TTLs) mixed with arbitrary ones. Invariants: every answer is 2xx or a 4xx in
the standard error shape, and a 4xx writes nothing.

Examples are derandomised by default so CI is reproducible; HYPOTHESIS_PROFILE=deep explores
more at random.
"""
from __future__ import annotations

import asyncio
import os
from datetime import UTC

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from services.features.dtypes import INT_MAX, INT_MIN, MAX_KEY_CHARS, MAX_STRING_CHARS, MAX_TTL_SECONDS
from tests.integration.test_features_store import running

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("deep", max_examples=500, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ENTITY, VIEW = "prop_user", "prop_view"
INT_ENTITY, INT_VIEW = "prop_account", "prop_account_view"
DOC = {
    "entities": [{"name": ENTITY, "join_key": "user_id", "dtype": "string"},
                 {"name": INT_ENTITY, "join_key": "account_id", "dtype": "int"}],
    "feature_views": [
        {"name": VIEW, "entity": ENTITY, "ttl_seconds": 0, "features": [
            {"name": "i", "dtype": "int"}, {"name": "f", "dtype": "float"},
            {"name": "s", "dtype": "string"}, {"name": "b", "dtype": "bool"}]},
        {"name": INT_VIEW, "entity": INT_ENTITY, "ttl_seconds": 3600, "features": [{"name": "i", "dtype": "int"}]}],
}

# -- strategies: each type's boundaries, just beyond them, and anything else ------------------
edge_ints = st.sampled_from([0, -1, 1, INT_MIN, INT_MAX, INT_MIN - 1, INT_MAX + 1, 2**53 + 1, 2**70, -(2**70),
                             10**400])
ints = edge_ints | st.integers()
edge_floats = st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                               -1.7976931348623157e308, 1e20, 9.223372036854776e18, 0.1, float("nan"),
                               float("inf"), float("-inf")])
floats = edge_floats | st.floats()
edge_texts = st.sampled_from(["", "a", "\x00", "a\x00b", "\ud800", "\udfff", "é", "🙂", "x" * MAX_STRING_CHARS,
                              "x" * (MAX_STRING_CHARS + 1), " ", "null"])
texts = edge_texts | st.text(max_size=50)
edge_times = st.sampled_from([
    "0001-01-01T00:00:00Z", "0001-01-01T00:00:00.001Z", "0001-01-01T00:00:00+00:01", "0001-01-01",
    "9999-12-31T23:59:59.9999Z", "9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999999Z",
    "9999-12-31T23:59:59-00:01", "9999-12-31T23:59:59+14:00", "10000-01-01T00:00:00Z", "1970-01-01T00:00:00Z",
    "2025-02-29T00:00:00Z", "2024-02-29T23:59:59.9995Z", "not a time", "", "2025-01-01T25:00:00Z"])
times = edge_times | st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()) | \
    st.integers(min_value=-(10**13), max_value=10**13) | floats
keys = (st.sampled_from(["u1", "", "x" * MAX_KEY_CHARS, "x" * (MAX_KEY_CHARS + 1), "\x00", "\ud800", "a:b*"]) |
        st.text(max_size=20) | ints)
anything = st.none() | st.booleans() | ints | floats | texts | st.lists(st.integers(), max_size=2) | \
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
feature_value = {"i": ints | anything, "f": floats | anything, "s": texts | anything, "b": st.booleans() | anything}
durations = (st.sampled_from([0, 1, MAX_TTL_SECONDS, MAX_TTL_SECONDS + 1, 2**31, 2**63, 2**70, 10**12, -1]) |
             st.integers() | st.sampled_from(["99999999w", "1w", "0", "24h", "1e3", " 5 d", "", "-1s", "7"]))


@st.composite
def push_rows(draw):
    rows = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        row = {"user_id": draw(keys)}
        if draw(st.booleans()):
            row["event_time"] = draw(times)
        for name, strategy in feature_value.items():
            if draw(st.integers(min_value=0, max_value=9)):  # mostly present
                row[name] = draw(strategy)
        rows.append(row)
    return rows


# -- harness ---------------------------------------------------------------------------------
@pytest.fixture
async def prop(database_url, redis_url):
    async with running(database_url, redis_url) as (client, store):
        r = await client.post("/admin/features/apply", json=DOC)
        assert r.status_code == 200, r.text
        yield client, store, asyncio.get_running_loop()


def run_property(loop, test) -> None:
    """Hypothesis drives a sync function; each example's requests run on the test's event loop."""
    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)

    test(call)


def check_answer(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
        assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)


async def written(store) -> tuple[int, int]:
    """(offline rows, online keys) of the test's views: what a 4xx must leave unchanged."""
    async with store.engine.connect() as conn:
        offline = (await conn.execute(text("SELECT count(*) FROM features.offline_rows"))).scalar()
    online = 0
    async for _ in store.online_store.redis.scan_iter(match=f"{store.online_store.prefix}online:*", count=1000):
        online += 1
    return offline, online


async def json_post(client, path, body):
    # httpx's json= would refuse NaN; send what a careless client sends (Python's json allows it).
    import json

    return await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


# -- properties ------------------------------------------------------------------------------
async def test_push_answers_2xx_or_a_4xx_that_wrote_nothing(prop):
    client, store, loop = prop

    @PROFILE
    @given(rows=push_rows(), to=st.sampled_from(["online_and_offline", "offline", "online"]))
    def prop_push(call, rows, to):
        before = call(written(store))
        r = call(json_post(client, "/v1/features/push", {"view": VIEW, "rows": rows, "to": to}))
        check_answer(r)
        after = call(written(store))
        if r.status_code >= 400:
            assert after == before, (rows, r.text)
        else:
            body = r.json()
            assert after[0] - before[0] == (len(rows) if to != "online" else 0)
            assert body["online_written"] + body["online_unchanged"] + body["online_skipped_older"] == \
                (len(rows) if to != "offline" else 0)

    await asyncio.to_thread(run_property, loop, lambda call: prop_push(call))


async def test_online_read_answers_2xx_or_4xx(prop):
    client, _, loop = prop

    @PROFILE
    @given(entity=st.sampled_from([ENTITY, INT_ENTITY]) | texts,
           ids=st.lists(keys, min_size=0, max_size=4),
           features=st.lists(st.sampled_from([VIEW, INT_VIEW, f"{VIEW}:i", f"{VIEW}:nope", "nope", ":", ""]) | texts,
                             min_size=0, max_size=3))
    def prop_online(call, entity, ids, features):
        r = call(json_post(client, "/v1/features/online", {"entity": entity, "ids": ids, "features": features}))
        check_answer(r)

    await asyncio.to_thread(run_property, loop, lambda call: prop_online(call))


async def test_historical_answers_2xx_or_4xx(prop):
    client, _, loop = prop

    @PROFILE
    @given(entity=st.sampled_from([ENTITY, INT_ENTITY]),
           rows=st.lists(st.fixed_dictionaries({"id": keys, "timestamp": times}), min_size=1, max_size=4),
           features=st.sampled_from([[VIEW], [INT_VIEW], [f"{VIEW}:f", f"{VIEW}:s"]]))
    def prop_historical(call, entity, rows, features):
        r = call(json_post(client, "/v1/features/historical", {"entity": entity, "rows": rows, "features": features}))
        check_answer(r)

    await asyncio.to_thread(run_property, loop, lambda call: prop_historical(call))


async def test_apply_answers_2xx_or_a_4xx_that_changed_nothing(prop):
    client, _, loop = prop
    counter = iter(range(10**9))

    @PROFILE
    @given(ttl=durations, ttl_key=st.sampled_from(["ttl", "ttl_seconds"]), description=texts, owner=texts,
           tags=st.dictionaries(texts, texts, max_size=2),
           dtype=st.sampled_from(["int", "float", "string", "bool", "decimal", ""]),
           key_dtype=st.sampled_from(["string", "int", "uuid"]))
    def prop_apply(call, ttl, ttl_key, description, owner, tags, dtype, key_dtype):
        n = next(counter)
        doc = {"entities": [{"name": f"pe_{n}", "join_key": "k", "dtype": key_dtype, "description": description}],
               "feature_views": [{"name": f"pv_{n}", "entity": f"pe_{n}", ttl_key: ttl, "description": description,
                                  "owner": owner, "tags": tags, "features": [{"name": "x", "dtype": dtype}]}]}
        r = call(json_post(client, "/admin/features/apply", doc))
        check_answer(r)
        view = call(client.get(f"/admin/features/views/pv_{n}"))
        entity = call(client.get(f"/admin/features/entities/pe_{n}"))
        if r.status_code >= 400:
            assert (view.status_code, entity.status_code) == (404, 404), (doc, r.text)
        else:
            assert view.status_code == 200 and 0 <= view.json()["ttl_seconds"] <= MAX_TTL_SECONDS

    await asyncio.to_thread(run_property, loop, lambda call: prop_apply(call))


def test_the_boundaries_are_the_documented_ones():
    """docs/features.md states these numbers; keep them in step."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "features.md").read_text()
    for bound in (str(INT_MAX), str(INT_MIN), f"{MAX_STRING_CHARS:,}", f"{MAX_KEY_CHARS}", f"{MAX_TTL_SECONDS:,}",
                  "0001-01-01T00:00:00.001Z", "9999-12-31T23:59:59.999Z"):
        assert bound in doc, bound
