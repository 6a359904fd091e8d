"""The feature store's facade, framework-free: what routes (api.py) and the CLI (cli.py) call.

Split along Feast's lines, each part behind a small interface:
  registry.py     entities and feature views (RegistryStore), feature selection
  offline.py      the append-only offline store in Postgres and point-in-time SQL (OfflineStore)
  online.py       the latest value per entity in Redis (OnlineStore)
  materialize.py  the one path from offline to online (Materializer), used by pushes too
  seed.py         the demo data
  dtypes.py       value types and their bounds, checked before anything is written

Write path: validate every value against its bounds -> append offline (commit) -> bring the
pushed keys' online values in line from the offline store. Other services call this over HTTP
through services.features.client.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.chassis.errors import AppError

from . import metrics as m
from .dtypes import check_value, entity_key, from_ms, parse_time, plain, to_ms
from .materialize import Materializer, utcnow
from .offline import OfflineStore, as_dtypes, float_features
from .online import OLDER, UNCHANGED, WRITTEN, OnlineLookup, OnlineRow, OnlineStore, WriteCounts
from .pii import PiiCipher
from .registry import Registry, RegistryStore, Selection, select_features
from .schemas import Change, EntitySpec, FeatureView, FeatureViewSpec, RegistryDoc

log = logging.getLogger("aistack.features")

_INGEST_CHUNK = 5000


class FeatureStore:
    """One per process. `redis` may be None for offline-only work (CLI, training)."""

    def __init__(self, engine: AsyncEngine, redis=None, *, prefix: str = "features:",
                 registry_cache_s: float = 5.0, expired_grace_s: int = 86400, max_online_ids: int = 1000,
                 max_historical_rows: int = 100_000, max_push_rows: int = 10_000,
                 materialize_lag_s: int = 0, pii_keys: str | None = None):
        self.engine = engine
        # PII features are sealed at rest (pii.py); keys default to FEATURES_PII_KEYS.
        self.pii = PiiCipher(pii_keys if pii_keys is not None else os.environ.get("FEATURES_PII_KEYS"))
        self.registry_store = RegistryStore(engine, registry_cache_s)
        self.offline = OfflineStore(engine)
        self.online_store = OnlineStore(redis, prefix, expired_grace_s) if redis is not None else None
        self.materializer = Materializer(engine, self.registry_store, self.offline, self.online_store,
                                         materialize_lag_s) if self.online_store is not None else None
        self.max_online_ids = max_online_ids
        self.max_historical_rows = max_historical_rows
        self.max_push_rows = max_push_rows
        self._ttls_checked: Registry | None = None

    # -- registry ------------------------------------------------------------------------------
    async def registry(self, fresh: bool = False) -> Registry:
        reg = await self.registry_store.snapshot(fresh)
        if self.online_store is not None and reg is not self._ttls_checked:
            try:
                await self._apply_ttls(reg)
            except (RedisError, OSError) as exc:  # offline work never waits for Redis; retried next load
                log.warning("online TTLs not checked (Redis: %s)", exc)
        return reg

    async def apply(self, doc: RegistryDoc, dry_run: bool = False) -> list[Change]:
        changes = await self.registry_store.apply(doc, dry_run)
        if not dry_run:
            await self.registry(fresh=True)
        return changes

    async def put(self, kind: str, spec: EntitySpec | FeatureViewSpec, create_only: bool = False) -> Change:
        change = await self.registry_store.put(kind, spec, create_only)
        await self.registry(fresh=True)
        return change

    async def _apply_ttls(self, reg: Registry) -> None:
        """A TTL change applies to values already online: their keys get the new expiry.

        Redis remembers the TTL each view's keys were last expired with, so a change made
        anywhere (this replica, another one, `aistack features apply`, before a restart) is
        applied by the first replica that loads the new registry.
        """
        applied = await self.online_store.applied_ttls(list(reg.views))
        for view in reg.views.values():
            before = applied.get(view.name)
            if before is not None and before != view.ttl_seconds:
                n = await self.online_store.reexpire(view.name, view.ttl_seconds, to_ms(utcnow()))
                log.info("view %s: TTL %ds -> %ds, re-expired %d online keys", view.name, before,
                         view.ttl_seconds, n)
            if before != view.ttl_seconds:
                await self.online_store.set_applied_ttl(view.name, view.ttl_seconds)
        self._ttls_checked = reg

    async def delete(self, kind: str, name: str) -> Change:
        change = await self.registry_store.delete(kind, name)
        if kind == "feature_view" and self.online_store is not None:
            await self.online_store.drop_view(name)
        return change

    async def history(self, kind: str, name: str) -> list[dict]:
        return await self.registry_store.history(kind, name)

    # -- validation ----------------------------------------------------------------------------
    def validate_rows(self, reg: Registry, view: FeatureView, rows: Sequence[dict[str, Any]],
                      *, default_time: datetime | None = None, loc: str = "rows") -> list[OnlineRow]:
        """Rows typed per the registry -> (key, event ms, values); 422 naming every bad field."""
        entity = reg.entity(view.entity)
        dtypes = {f.name: f.dtype for f in view.features}
        allowed = {entity.join_key, "event_time", *dtypes}
        errors: list[dict] = []
        out: list[OnlineRow] = []

        def bad(i: int, fld: str, msg: str, kind: str) -> None:
            errors.append({"loc": [loc, i, fld], "msg": msg, "type": kind})

        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                bad(i, "", "expected an object", "type_error")
                continue
            for extra in sorted(set(row) - allowed):
                bad(i, extra[:100], f"unknown field: view '{view.name}' has no such feature", "extra_forbidden")
            key = None
            if entity.join_key not in row:
                bad(i, entity.join_key, "join key missing", "missing")
            else:
                try:
                    key = entity_key(entity.dtype, row[entity.join_key])
                except ValueError as exc:
                    bad(i, entity.join_key, str(exc), "value_error")
            event_time = default_time
            if row.get("event_time") is not None:
                try:
                    event_time = parse_time(row["event_time"])
                except ValueError as exc:
                    bad(i, "event_time", str(exc), "value_error")
                    event_time = None
            elif event_time is None:
                bad(i, "event_time", "event_time missing", "missing")
            values: dict[str, Any] = {}
            for name, dtype in dtypes.items():
                if name not in row:
                    bad(i, name, "feature missing (send null for an unknown value)", "missing")
                    continue
                try:
                    values[name] = check_value(dtype, plain(row[name]))
                except ValueError as exc:
                    bad(i, name, str(exc), "value_error")
            if key is not None and event_time is not None and len(values) == len(dtypes):
                out.append(OnlineRow(key, to_ms(event_time), values))
        if errors:
            fields = sorted({f"{e['loc'][0]}[{e['loc'][1]}].{e['loc'][2]}" for e in errors[:20]})
            raise AppError(422, "validation_error", f"invalid rows for view '{view.name}': {', '.join(fields)}",
                           errors[:100])
        return out

    def seal_rows(self, view: FeatureView, rows: list[OnlineRow]) -> list[OnlineRow]:
        """Encrypt the values of the view's PII features (both stores keep them sealed)."""
        pii = {f.name for f in view.features if f.pii}
        if not pii:
            return rows
        return [OnlineRow(r.entity_key, r.event_ms, self.pii.seal_values(r.values, pii)) for r in rows]

    def _online(self) -> OnlineStore:
        if self.online_store is None:
            raise AppError(503, "online_store_unavailable", "this process has no Redis (online store)")
        return self.online_store

    # -- writes --------------------------------------------------------------------------------
    async def push(self, view_name: str, rows: Sequence[dict[str, Any]], to: str = "online_and_offline") -> dict:
        """Validate every value, append offline (the record), then bring online in line from it.

        A 4xx writes nothing. With the offline store, the online write is the materialiser's
        for the pushed keys: should it fail, the next push of a key or the next incremental run
        repairs it. `to: online` alone writes the rows as they are, versioned by arrival time.
        """
        if len(rows) > self.max_push_rows:
            raise AppError(413, "too_many_rows", f"at most {self.max_push_rows} rows per push")
        reg = await self.registry()
        view = reg.view(view_name)
        typed = self.seal_rows(view, self.validate_rows(reg, view, rows, default_time=utcnow()))
        if to != "offline":
            self._online()  # no Redis here: refuse before writing anything
        offline = 0
        counts = WriteCounts()
        if to in ("online_and_offline", "offline"):
            stored = await self.offline.insert_versioned(view.name, typed, "push")
            offline = len(stored)
            m.ROWS_WRITTEN.labels(view.name, "offline", "push").inc(offline)
            if to == "online_and_offline":
                counts = await self._sync_pushed(view, stored)
        elif to == "online":
            now = utcnow()
            arrival_us = to_ms(now) * 1000
            counts = await self._online().write(
                view.name, view.ttl_seconds,
                [OnlineRow(r.entity_key, r.event_ms, r.values, arrival_us, i) for i, r in enumerate(typed)],
                to_ms(now))
        m.ROWS_WRITTEN.labels(view.name, "online", "push").inc(counts.written)
        return {"view": view.name, "rows": len(typed), "offline_written": offline,
                "online_written": counts.written, "online_unchanged": counts.unchanged,
                "online_skipped_older": counts.older}

    async def _sync_pushed(self, view: FeatureView, stored: list[OnlineRow]) -> WriteCounts:
        """Online write of a push through the materialiser; counts per pushed row: written, or
        unchanged (its values were already stored), or older (another row is the newest)."""
        latest, synced = await self._materializer().sync_keys(view, [r.entity_key for r in stored])
        outcome = {r.row_id: result for r, result in zip(latest, synced.results or [])}
        out = WriteCounts()
        for row in stored:
            result = outcome.get(row.row_id, OLDER)  # not the newest row of its key
            if result == WRITTEN:
                out.written += 1
            elif result == UNCHANGED:
                out.unchanged += 1
            elif result is None:
                out.invalid += 1
            else:
                out.older += 1
        return out

    def _materializer(self) -> Materializer:
        if self.materializer is None:
            raise AppError(503, "online_store_unavailable", "this process has no Redis (online store)")
        return self.materializer

    async def ingest(self, view_name: str, records: Iterable[dict[str, Any]], source: str = "ingest",
                     chunk: int = _INGEST_CHUNK, progress: Callable[[int], None] | None = None) -> int:
        """Append records (e.g. a CSV/Parquet file's rows) to the offline store, validated per chunk.

        All chunks go in one transaction: a bad row anywhere leaves the store unchanged.
        """
        reg = await self.registry(fresh=True)
        view = reg.view(view_name)
        total = 0
        batch: list[dict] = []
        async with self.engine.begin() as conn:
            for rec in records:
                batch.append(rec)
                if len(batch) >= chunk:
                    total += await self._ingest_chunk(conn, reg, view, batch, source, total)
                    batch = []
                    if progress:
                        progress(total)
            if batch:
                total += await self._ingest_chunk(conn, reg, view, batch, source, total)
                if progress:
                    progress(total)
        m.ROWS_WRITTEN.labels(view.name, "offline", "ingest").inc(total)
        return total

    async def _ingest_chunk(self, conn, reg, view, batch, source, offset) -> int:
        try:
            typed = self.validate_rows(reg, view, batch)
        except AppError as exc:  # report file row numbers, not chunk positions
            for d in exc.details or []:
                d["loc"][1] += offset
            exc.message = "invalid rows: " + ", ".join(
                sorted({f"row {d['loc'][1]} {d['loc'][2]}: {d['msg']}" for d in (exc.details or [])[:10]}))
            raise
        return await self.offline.insert(view.name, self.seal_rows(view, typed), source, conn)

    # -- reads ---------------------------------------------------------------------------------
    def _keys(self, sel: Selection, ids: Sequence[Any], loc: str) -> list[str]:
        keys = []
        for i, raw in enumerate(ids):
            try:
                keys.append(entity_key(sel.entity.dtype, raw))
            except ValueError as exc:
                raise AppError(422, "validation_error", f"{loc}[{i}]: {exc}",
                               [{"loc": [loc, i], "msg": str(exc), "type": "value_error"}]) from None
        return keys

    async def online(self, entity: str, ids: Sequence[str | int], features: Sequence[str],
                     full_names: bool = False) -> dict:
        """Latest values of `features` for `ids`, one pipelined Redis round trip for all of them.

        Expiry is judged here against the view's current TTL, so a TTL change applies at once.
        """
        if len(ids) > self.max_online_ids:
            raise AppError(413, "too_many_ids", f"at most {self.max_online_ids} ids per read")
        start = time.perf_counter()
        reg = await self.registry()
        sel = select_features(reg, entity, features, full_names)
        keys = self._keys(sel, ids, "ids")
        lookups = [OnlineLookup(v.name, key, sel.features[v.name]) for key in keys for v in sel.views]
        raw = await self._online().read(lookups)
        now_ms = to_ms(utcnow())
        counts: dict[tuple[str, str], int] = {}
        results = []
        per_entity = len(sel.views)
        for n, raw_id in enumerate(ids):
            found: dict[tuple[str, str], tuple[Any, str, datetime | None]] = {}
            for j, view in enumerate(sel.views):
                ts, values = raw[n * per_entity + j]
                event_time = _event_time(ts)
                if event_time is None:  # nothing stored, or a stamp outside today's bounds
                    ts, values = None, [None] * len(values)
                expired = ts is not None and view.ttl_seconds > 0 and now_ms - ts > view.ttl_seconds * 1000
                for fname, value in zip(sel.features[view.name], values):
                    value = self.pii.open(value)
                    if value is None:
                        status = "missing"
                    elif expired:
                        status, value = "expired", None
                    else:
                        status = "present"
                    found[(view.name, fname)] = (value, status, event_time)
                    counts[(view.name, status)] = counts.get((view.name, status), 0) + 1
            results.append(_shape(raw_id, sel, found))
        for (view, status), c in counts.items():
            m.ONLINE_VALUES.labels(view, status).inc(c)
        m.ONLINE_READ_SECONDS.observe(time.perf_counter() - start)
        return {"entity": sel.entity.name, "join_key": sel.entity.join_key,
                "features": [n for n, _, _ in sel.names], "results": results}

    async def historical(self, entity: str, rows: Sequence[dict[str, Any]], features: Sequence[str],
                         full_names: bool = False) -> dict:
        """Point-in-time correct values for (id, timestamp) rows, computed in Postgres.

        Per row and view: the newest offline row with event_time <= timestamp; 'expired' (value
        null) when it is older than timestamp - ttl, 'missing' when there is none. Never a value
        from after the timestamp.
        """
        if len(rows) > self.max_historical_rows:
            raise AppError(413, "too_many_rows", f"at most {self.max_historical_rows} rows per request")
        start = time.perf_counter()
        reg = await self.registry()
        sel = select_features(reg, entity, features, full_names)
        keys, stamps = [], []
        for i, row in enumerate(rows):
            try:
                keys.append(entity_key(sel.entity.dtype, row["id"]))
                stamps.append(parse_time(row["timestamp"]))
            except (KeyError, ValueError) as exc:
                raise AppError(422, "validation_error", f"rows[{i}]: {exc}") from None
        result = await self.offline.point_in_time(keys, stamps, [(v.name, v.ttl_seconds) for v in sel.views])
        floats = [float_features(v) for v in sel.views]
        out = []
        for row, src, ts in zip(result, rows, stamps):
            found = {}
            for j, view in enumerate(sel.views):
                event_time, status = row[1 + 3 * j], row[2 + 3 * j]
                values = as_dtypes(row[3 + 3 * j], floats[j])
                for fname in sel.features[view.name]:
                    value = self.pii.open((values or {}).get(fname)) if status == "present" else None
                    st = "missing" if status == "present" and value is None else status
                    found[(view.name, fname)] = (value, st, event_time)
            out.append({**_shape(src["id"], sel, found), "timestamp": ts})
        m.HISTORICAL_SECONDS.observe(time.perf_counter() - start)
        return {"entity": sel.entity.name, "join_key": sel.entity.join_key,
                "features": [n for n, _, _ in sel.names], "rows": out}

    # -- materialisation -----------------------------------------------------------------------
    async def materialize(self, views: Sequence[str] | None = None, start: datetime | None = None,
                          end: datetime | None = None,
                          progress: Callable[[dict], None] | None = None) -> list[dict]:
        """See Materializer.run."""
        return await self._materializer().run(views, start and parse_time(start), end and parse_time(end),
                                              progress)

    # -- stats and freshness -------------------------------------------------------------------
    async def newest_online(self, views: Sequence[str]) -> dict[str, datetime | None]:
        raw = await self._online().newest(views)
        return {v: _event_time(ms) for v, ms in raw.items()}

    async def refresh_freshness(self) -> dict[str, float | None]:
        reg = await self.registry()
        newest = await self.newest_online(list(reg.views))
        now = utcnow()
        out = {}
        for view, ts in newest.items():
            if ts is None:
                out[view] = None
                continue
            out[view] = (now - ts).total_seconds()
            m.FRESHNESS_SECONDS.labels(view).set(out[view])
            m.NEWEST_EVENT.labels(view).set(ts.timestamp())
        return out

    async def stats(self) -> dict:
        reg = await self.registry(fresh=True)
        totals, state, last_runs = await self.offline.stats()
        newest = await self.newest_online(list(reg.views)) if self.online_store is not None else {}
        now = utcnow()
        views = []
        for view in reg.views.values():
            on = newest.get(view.name)
            total = totals.get(view.name)
            views.append({
                "view": view.name, "version": view.version, "ttl_seconds": view.ttl_seconds,
                "offline_rows": total.rows if total else 0,
                "offline_newest_event_time": total.newest if total else None,
                "online_newest_event_time": on,
                "freshness_seconds": (now - on).total_seconds() if on else None,
                "materialized_to": state.get(view.name),
                "last_materialization": last_runs.get(view.name),
            })
        reads = {}
        for metric in m.ONLINE_VALUES.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    reads[status] = reads.get(status, 0.0) + sample.value
        return {"views": views, "online_reads": reads}

    async def seed_demo(self, customers: int = 1000, snapshots: int = 4) -> dict:
        from .seed import seed_demo

        return await seed_demo(self, customers, snapshots)


def _event_time(ms: int | None) -> datetime | None:
    """Epoch ms -> datetime; None for a stamp outside datetime's range (written before the bounds)."""
    if ms is None:
        return None
    try:
        return from_ms(ms)
    except OverflowError:
        return None


def _shape(raw_id: Any, sel: Selection, found: dict) -> dict:
    values, statuses, times = {}, {}, {}
    for out_name, view, fname in sel.names:
        value, status, event_time = found[(view, fname)]
        values[out_name], statuses[out_name], times[out_name] = value, status, event_time
    return {"id": raw_id, "values": values, "statuses": statuses, "event_times": times}


# -- module-level entry points (scripts, tests) ------------------------------------------------
async def materialize(engine: AsyncEngine, redis, views: Sequence[str] | None = None,
                      start: datetime | None = None, end: datetime | None = None,
                      prefix: str = "features:") -> list[dict]:
    """Materialise without an app (see Materializer.run)."""
    return await FeatureStore(engine, redis, prefix=prefix).materialize(views, start, end)
