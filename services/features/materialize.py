"""Materialisation: the one path by which the online store is brought in line with the offline store.

Scheduled incremental runs, explicit windows and every push (for the keys it touched) all go
through `Materializer`: read the newest committed offline row per entity, write it online where
it is newer (online.py compares event time, then created_at and id). So a push whose online
write failed after its offline commit is repaired by the next push of that key or by the next
incremental run (which also picks up rows committed late), and never left half-done.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from services.chassis.errors import dependency_unavailable_errors

from . import metrics as m
from .dtypes import to_ms
from .models import materialization_runs, materialization_state
from .offline import OfflineStore, float_features, latest_in_window_sql, online_row
from .online import OnlineRow, OnlineStore, WriteCounts
from .registry import RegistryStore, lock_sql
from .schemas import FeatureView

log = logging.getLogger("aistack.features")

# Now, and the horizon below which every offline row is already visible: a row's created_at is
# its transaction's start, so rows still uncommitted were created at or after the oldest open
# transaction's start. Incremental runs resume from there, so late commits are never skipped.
_HORIZON_SQL = (
    "SELECT clock_timestamp(), LEAST(clock_timestamp(), (SELECT min(xact_start) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
    "AND xact_start IS NOT NULL))"
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Materializer:
    def __init__(self, engine: AsyncEngine, registry: RegistryStore, offline: OfflineStore,
                 online: OnlineStore, lag_s: int = 0):
        self.engine, self.registry, self.offline, self.online = engine, registry, offline, online
        self.lag = timedelta(seconds=lag_s)

    async def sync_keys(self, view: FeatureView, keys: Sequence[str]) -> tuple[list[OnlineRow], WriteCounts]:
        """Bring these entities' online values in line with their newest offline rows; returns
        those rows and, per row in `counts.results`, what the online store did with it."""
        rows = await self.offline.latest_for_keys(view, keys)
        return rows, await self.online.write(view.name, view.ttl_seconds, rows, to_ms(utcnow()))

    async def run(self, views: Sequence[str] | None = None, start: datetime | None = None,
                  end: datetime | None = None, progress: Callable[[dict], None] | None = None) -> list[dict]:
        """Copy the newest offline value per entity in a window of event time to the online store.

        No start and no end: incremental, from where the last incremental run stopped (late rows
        committed since then included) to now, and remember the new position. With start and/or
        end: that window only; the incremental position is untouched. Idempotent either way.
        One view failing (logged, reported in its result) never stops the others; a stored row
        that cannot be encoded is counted as invalid and skipped, never blocking its view.
        """
        reg = await self.registry.snapshot(fresh=True)
        targets = [reg.view(n) for n in (list(views) if views else list(reg.views))]
        incremental = start is None and end is None
        unavailable = dependency_unavailable_errors()
        results = []
        for view in targets:
            try:
                result = await self._view(view, start, end, incremental)
            except unavailable:
                raise  # Redis or Postgres down: the whole run answers 503, retried by its caller
            except Exception as exc:  # reported per view; the next views still run
                log.exception("materialising %s failed", view.name)
                result = {"view": view.name, "incremental": incremental, "start": start, "end": end or utcnow(),
                          "entities": 0, "written": 0, "unchanged": 0, "invalid": 0,
                          "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            results.append(result)
            if progress:
                progress(result)
        return results

    async def _view(self, view: FeatureView, start: datetime | None, end: datetime | None,
                    incremental: bool) -> dict:
        t0 = time.perf_counter()
        started = utcnow()
        async with self.engine.connect() as conn, conn.begin():
            # One run per view at a time (pipeline schedule and admin call may overlap).
            await conn.execute(lock_sql(), {"k": f"features.materialize:{view.name}"})
            now, horizon = (await conn.execute(text(_HORIZON_SQL))).one()
            end = end or now
            params: dict[str, Any] = {"view": view.name, "end": end}
            created_from = None
            if incremental:
                state = (await conn.execute(select(materialization_state)
                                            .where(materialization_state.c.view == view.name))).mappings().first()
                if state is not None:
                    start, created_from = state["event_time_to"], state["created_to"]
            if start is not None:
                params["start"] = start
            if created_from is not None:
                params["created_from"] = created_from
            min_event = now - timedelta(seconds=view.ttl_seconds) if view.ttl_seconds > 0 else None
            if min_event is not None:
                params["min_event"] = min_event
            sql = latest_in_window_sql(has_start=start is not None, incremental_late=created_from is not None,
                                       has_min_event=min_event is not None)
            entities_n = 0
            totals = WriteCounts()
            now_ms = to_ms(utcnow())
            floats = float_features(view)
            result = await conn.stream(text(sql), params)
            async for part in result.partitions(2000):
                rows = [online_row(r, floats) for r in part]
                counts = await self.online.write(view.name, view.ttl_seconds, rows, now_ms)
                entities_n += len(rows)
                totals.written += counts.written
                totals.unchanged += counts.unchanged
                totals.invalid += counts.invalid
            if incremental:
                values = {"event_time_to": end, "created_to": horizon - self.lag, "updated_at": func.now()}
                await conn.execute(pg_insert(materialization_state).values(view=view.name, **values)
                                   .on_conflict_do_update(index_elements=["view"], set_=values))
            await conn.execute(insert(materialization_runs).values(
                view=view.name, incremental=incremental, window_start=start, window_end=end,
                entities=entities_n, written=totals.written, started_at=started,
                finished_at=func.clock_timestamp()))
        m.ROWS_WRITTEN.labels(view.name, "online", "materialize").inc(totals.written)
        m.MATERIALIZE_SECONDS.labels(view.name).observe(time.perf_counter() - t0)
        log.info("materialised %s: %d entities, %d written, %d unchanged, %d invalid (%s .. %s)", view.name,
                 entities_n, totals.written, totals.unchanged, totals.invalid, start, end)
        return {"view": view.name, "incremental": incremental, "start": start, "end": end,
                "entities": entities_n, "written": totals.written, "unchanged": totals.unchanged,
                "invalid": totals.invalid, "error": None}
