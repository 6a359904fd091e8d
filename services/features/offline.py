"""The offline store: append-only rows in Postgres (`features.offline_rows`), the record of truth.

Every row has an event time (when the value was observed) and a created_at/id (when the store
committed it). Point-in-time retrieval and "latest per entity" order by (event_time, created_at,
id), newest first: at one event time the row committed last is the correction that wins, here
and in the online store alike.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .dtypes import EPOCH, from_ms, to_ms
from .models import materialization_state, offline_rows
from .online import OnlineRow

_INSERT_CHUNK = 5000
_US = timedelta(microseconds=1)
_ORDER = "ORDER BY entity_key, event_time DESC, created_at DESC, id DESC"
_COLUMNS = "entity_key, event_time, created_at, id, values"


def pit_sql(view_params: Sequence[tuple[str, str]]) -> str:
    """Point-in-time join, one LATERAL lookup per view over the entity rows given as arrays.

    For each (id, ts) row and view: the newest offline row with event_time <= ts (ties broken by
    the newest created_at), reported 'present' only when event_time >= ts - ttl. Uses the
    (view, entity_key, event_time DESC, created_at DESC) index: one index probe per row and view.
    """
    selects, joins = ["q.idx"], []
    for i, (view_param, ttl_param) in enumerate(view_params):
        selects.append(
            f"v{i}.event_time AS et{i}, "
            f"CASE WHEN v{i}.event_time IS NULL THEN 'missing' "
            f"WHEN CAST(:{ttl_param} AS integer) > 0 AND v{i}.event_time < "
            f"q.ts - CAST(:{ttl_param} AS integer) * interval '1 second' "
            f"THEN 'expired' ELSE 'present' END AS st{i}, "
            f"v{i}.values AS val{i}")
        joins.append(
            f"LEFT JOIN LATERAL (SELECT o.event_time, o.values FROM features.offline_rows o "
            f"WHERE o.view = CAST(:{view_param} AS text) AND o.entity_key = q.key AND o.event_time <= q.ts "
            f"ORDER BY o.event_time DESC, o.created_at DESC, o.id DESC LIMIT 1) v{i} ON true")
    return (
        "SELECT " + ", ".join(selects) +
        " FROM unnest(CAST(:idx AS integer[]), CAST(:keys AS text[]), CAST(:ts AS timestamptz[]))"
        " AS q(idx, key, ts) " + " ".join(joins) + " ORDER BY q.idx"
    )


def latest_in_window_sql(*, has_start: bool, incremental_late: bool, has_min_event: bool) -> str:
    """The newest offline row per entity among the rows a materialisation run covers."""
    where = ["view = :view", "event_time < :end"]
    if has_start and incremental_late:
        # New event times since the last run, plus late rows ingested since then.
        where.append("(event_time >= :start OR created_at >= :created_from)")
    elif has_start:
        where.append("event_time >= :start")
    if has_min_event:
        where.append("event_time >= :min_event")  # already past the TTL: nothing to serve
    return f"SELECT DISTINCT ON (entity_key) {_COLUMNS} FROM features.offline_rows WHERE " + \
        " AND ".join(where) + f" {_ORDER}"


LATEST_FOR_KEYS_SQL = (f"SELECT DISTINCT ON (entity_key) {_COLUMNS} FROM features.offline_rows "
                       f"WHERE view = :view AND entity_key = ANY(CAST(:keys AS text[])) {_ORDER}")


def as_dtypes(values: dict[str, Any] | None, floats: frozenset[str]) -> dict[str, Any]:
    """Values read back from JSONB in their registry types: Postgres prints a numeric without an
    exponent, so a float such as 1e20 comes back as an int; float features are floats again."""
    if not values:
        return values or {}
    return {k: (float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool) else v)
            for k, v in values.items()}


def float_features(view: Any) -> frozenset[str]:
    return frozenset(f.name for f in view.features if f.dtype == "float")


def online_row(r: Any, floats: frozenset[str] = frozenset()) -> OnlineRow:
    """An offline row (entity_key, event_time, created_at, id, values) as the online store writes it."""
    return OnlineRow(r.entity_key, to_ms(r.event_time), as_dtypes(r.values, floats),
                     (r.created_at - EPOCH) // _US, r.id)


@dataclass
class ViewTotals:
    rows: int
    newest: datetime | None


class OfflineStore:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    async def insert(self, view: str, rows: Sequence[OnlineRow], source: str,
                     conn: AsyncConnection | None = None) -> int:
        """Append rows (in chunks; in `conn`'s transaction when given, else in one of its own)."""
        await self._append(view, rows, source, conn, None)
        return len(rows)

    async def insert_versioned(self, view: str, rows: Sequence[OnlineRow], source: str) -> list[OnlineRow]:
        """Append rows in one transaction; returns them with their offline version (created_at, id),
        which the online store compares at equal event times."""
        out: list[OnlineRow] = []
        await self._append(view, rows, source, None, out)
        return out

    async def _append(self, view: str, rows: Sequence[OnlineRow], source: str, conn: AsyncConnection | None,
                      versioned: list[OnlineRow] | None) -> None:
        if not rows:
            return
        stmt = insert(offline_rows)
        if versioned is not None:
            stmt = stmt.returning(offline_rows.c.id, offline_rows.c.created_at, sort_by_parameter_order=True)

        async def run(c: AsyncConnection) -> None:
            for i in range(0, len(rows), _INSERT_CHUNK):
                part = rows[i:i + _INSERT_CHUNK]
                result = await c.execute(stmt, [
                    {"view": view, "entity_key": r.entity_key, "values": r.values, "source": source,
                     "event_time": from_ms(r.event_ms)} for r in part])
                if versioned is not None:
                    versioned.extend(OnlineRow(r.entity_key, r.event_ms, r.values, (created - EPOCH) // _US, row_id)
                                     for r, (row_id, created) in zip(part, result.all()))

        if conn is not None:
            await run(conn)
        else:
            async with self.engine.begin() as c:
                await run(c)

    async def latest_for_keys(self, view: Any, keys: Sequence[str]) -> list[OnlineRow]:
        """The newest committed row of each key (what the online store must hold for it)."""
        if not keys:
            return []
        floats = float_features(view)
        async with self.engine.connect() as conn:
            result = await conn.execute(text(LATEST_FOR_KEYS_SQL), {"view": view.name, "keys": sorted(set(keys))})
            return [online_row(r, floats) for r in result]

    async def point_in_time(self, keys: list[str], stamps: list[datetime],
                            views: Sequence[tuple[str, int]]) -> list[Any]:
        """Per (key, timestamp) and (view, ttl): (idx, then event_time, status, values per view)."""
        params: dict[str, Any] = {"idx": list(range(len(keys))), "keys": keys, "ts": stamps}
        view_params = []
        for j, (name, ttl) in enumerate(views):
            params[f"view{j}"], params[f"ttl{j}"] = name, ttl
            view_params.append((f"view{j}", f"ttl{j}"))
        async with self.engine.connect() as conn:
            return list((await conn.execute(text(pit_sql(view_params)), params)).all())

    async def newest_event(self, view: str) -> datetime | None:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.max(offline_rows.c.event_time))
                                       .where(offline_rows.c.view == view))).scalar()

    async def only_source(self, view: str, source: str) -> bool:
        async with self.engine.connect() as conn:
            return not (await conn.execute(text(
                "SELECT EXISTS (SELECT 1 FROM features.offline_rows WHERE view = :v AND source <> :s)"),
                {"v": view, "s": source})).scalar()

    async def stats(self) -> tuple[dict[str, ViewTotals], dict[str, datetime], dict[str, dict]]:
        """Per view: row count and newest event, the incremental position, the last materialisation."""
        async with self.engine.connect() as conn:
            totals = {r.view: ViewTotals(r.n, r.newest) for r in await conn.execute(
                select(offline_rows.c.view, func.count().label("n"), func.max(offline_rows.c.event_time).label("newest"))
                .group_by(offline_rows.c.view))}
            state = {r.view: r.event_time_to for r in await conn.execute(select(materialization_state))}
            last_runs = {}
            for r in (await conn.execute(text(
                    "SELECT DISTINCT ON (view) view, incremental, window_start, window_end, entities, written, "
                    "started_at, finished_at FROM features.materialization_runs ORDER BY view, id DESC"))).mappings():
                last_runs[r["view"]] = {k: v for k, v in r.items() if k != "view"}
        return totals, state, last_runs
