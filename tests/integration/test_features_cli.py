"""`aistack features apply FILE` and `aistack features ingest FILE --view V` against real Postgres."""
from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime

import pandas as pd
import pytest
from typer.testing import CliRunner

from services.chassis.clients import db_engine
from services.features.cli import app
from services.features.service import FeatureStore


def registry_file(tmp_path, ent, view, ttl="1d"):
    path = tmp_path / "features.yaml"
    path.write_text(f"""
entities:
  - name: {ent}
    join_key: user_id
    dtype: string
feature_views:
  - name: {view}
    entity: {ent}
    ttl: {ttl}
    owner: tests
    features:
      - {{name: n, dtype: int}}
      - {{name: score, dtype: float}}
      - {{name: vip, dtype: bool}}
""")
    return path


async def cli(database_url, *args):
    # The CLI runs its own event loop: keep it off the test loop's thread.
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"DATABASE_URL": database_url})
    return result


@pytest.fixture
def names():
    suffix = secrets.token_hex(4)
    return f"ent_{suffix}", f"view_{suffix}"


async def test_apply_prints_changes_and_is_idempotent(database_url, tmp_path, names):
    ent, view = names
    path = registry_file(tmp_path, ent, view)
    first = await cli(database_url, "apply", str(path))
    assert first.exit_code == 0, first.output
    assert f"+ entity {ent}: created (v1)" in first.output and f"+ feature_view {view}: created (v1)" in first.output
    second = await cli(database_url, "apply", str(path))
    assert second.exit_code == 0 and "0 created, 0 updated, 2 unchanged" in second.output
    registry_file(tmp_path, ent, view, ttl="2d")
    dry = await cli(database_url, "apply", str(path), "--dry-run")
    assert "ttl_seconds: 86400 -> 172800" in dry.output and "dry run: 0 created, 1 updated, 1 unchanged" in dry.output
    third = await cli(database_url, "apply", str(path))
    assert f"~ feature_view {view}: updated (v2)" in third.output and "1 updated" in third.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("feature_views:\n  - name: x\n    entity: nope\n    features: [{name: a}]\n")
    failed = await cli(database_url, "apply", str(bad))
    assert failed.exit_code == 1 and "unknown entity 'nope'" in failed.output


async def test_ingest_csv_and_parquet(database_url, tmp_path, names):
    ent, view = names
    assert (await cli(database_url, "apply", str(registry_file(tmp_path, ent, view)))).exit_code == 0
    csv = tmp_path / "rows.csv"
    csv.write_text("user_id,ts,n,score,vip\n"
                   "u1,2025-01-01T00:00:00Z,1,0.5,true\n"
                   "u1,2025-01-02T00:00:00Z,2,1.5,false\n"
                   "u2,2025-01-01T00:00:00Z,7,,true\n")
    out = await cli(database_url, "ingest", str(csv), "--view", view, "--event-time-column", "ts")
    assert out.exit_code == 0, out.output
    assert f"ingested 3 rows into '{view}'" in out.output
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame({"user_id": ["u3"], "event_time": [datetime(2025, 1, 3, tzinfo=UTC)],
                  "n": [3], "score": [3.0], "vip": [False]}).to_parquet(parquet)
    out = await cli(database_url, "ingest", str(parquet), "--view", view)
    assert out.exit_code == 0 and "ingested 1 rows" in out.output, out.output

    engine = db_engine(database_url, pool_size=1)
    try:
        got = await FeatureStore(engine).historical(ent, [
            {"id": "u1", "timestamp": "2025-01-01T12:00:00Z"}, {"id": "u2", "timestamp": "2025-01-01T12:00:00Z"},
            {"id": "u3", "timestamp": "2025-01-03T12:00:00Z"}], [view])
    finally:
        await engine.dispose()
    u1, u2, u3 = got["rows"]
    assert u1["values"] == {"n": 1, "score": 0.5, "vip": True}
    assert u2["values"] == {"n": 7, "score": None, "vip": True} and u2["statuses"]["score"] == "missing"
    assert u3["values"] == {"n": 3, "score": 3.0, "vip": False}

    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,event_time,n,score,vip\nu9,2025-01-01T00:00:00Z,1,0.5,true\n"
                   "u9,2025-01-02T00:00:00Z,1.5,0.5,true\n")
    failed = await cli(database_url, "ingest", str(bad), "--view", view)
    assert failed.exit_code == 1 and "row 1 n: expected int" in failed.output, failed.output


async def test_ingest_and_materialise_report_progress_and_json(database_url, redis_url, tmp_path, names):
    import json as _json

    ent, view = names
    assert (await cli(database_url, "apply", str(registry_file(tmp_path, ent, view)))).exit_code == 0
    now = datetime.now(UTC).isoformat()
    csv = tmp_path / "fresh.csv"
    csv.write_text("user_id,event_time,n,score,vip\n" + "".join(f"m{i},{now},{i},0.5,true\n" for i in range(5)))
    out = await asyncio.to_thread(CliRunner().invoke, app, ["ingest", str(csv), "--view", view, "--json"],
                                  env={"DATABASE_URL": database_url})
    assert out.exit_code == 0, out.output
    assert _json.loads(out.stdout.strip().splitlines()[-1]) == {"view": view, "rows": 5}
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    out = await asyncio.to_thread(CliRunner().invoke, app, ["materialize", view, "--json"], env=env)
    assert out.exit_code == 0, out.output
    [result] = _json.loads(out.stdout.strip().splitlines()[-1])
    assert result["view"] == view and result["written"] == 5
    again = await asyncio.to_thread(CliRunner().invoke, app, ["materialize", view], env=env)
    assert again.exit_code == 0 and f"{view}:" in again.output and "written 0" in again.output, again.output
