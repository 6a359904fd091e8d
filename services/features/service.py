"""The feature store, framework-free: registry, push, online reads, point-in-time retrieval,
materialisation, the demo seed. Routes (api.py) and the CLI (cli.py) are thin layers over it.

Postgres (schema `features`) holds the registry and the append-only offline store; Redis holds
the latest value per (view, entity) (see store.py). Module-level helpers `materialize(...)` and
`get_historical_features(...)` are what the pipeline and scripts call without an app.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.chassis.errors import AppError

from . import metrics as m
from .models import (
    entities,
    feature_views,
    materialization_runs,
    materialization_state,
    offline_rows,
    registry_history,
)
from .pii import PiiCipher
from .schemas import Change, Entity, EntitySpec, FeatureView, FeatureViewSpec, RegistryDoc
from .store import OnlineLookup, OnlineRow, OnlineStore, latest_in_window_sql, pit_sql, to_ms

log = logging.getLogger("aistack.features")

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
DEMO_VIEW = "customer_transactions"
DEMO_SOURCE = "demo-seed"
_REGISTRY_LOCK = "features.registry"
_SEED_LOCK = "features.seed"
_INSERT_CHUNK = 5000
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


def _lock_sql(session: bool = False) -> Any:
    fn = "pg_advisory_lock" if session else "pg_advisory_xact_lock"
    return text(f"SELECT {fn}(hashtext(:k))")


# -- types -------------------------------------------------------------------------------------
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _plain(value: Any) -> Any:
    """numpy / pandas scalars to Python ones; NaN and NaT to None (what files give us)."""
    if value is None:
        return None
    item = getattr(value, "item", None)
    if item is not None and not isinstance(value, (str, bytes)):
        try:
            value = item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def check_value(dtype: str, value: Any) -> Any:
    """The value as the registry's dtype, or ValueError. Strict: no strings for numbers."""
    if value is None:
        return None
    if dtype == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("expected a finite float")
            return float(value)
    elif dtype == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif (dtype == "string" and isinstance(value, str)) or (dtype == "bool" and isinstance(value, bool)):
        return value
    raise ValueError(f"expected {dtype}, got {_type_name(value)}")


def parse_time(value: Any) -> datetime:
    """ISO 8601 string, datetime or epoch seconds -> aware UTC datetime (naive means UTC)."""
    value = _plain(value)
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        dt = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        dt = datetime.fromisoformat(value)
    else:
        raise ValueError(  # noqa: TRY004 - callers report ValueErrors as the field's error
            f"expected an ISO 8601 time or epoch seconds, got {_type_name(value)}")
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


# -- registry snapshot -------------------------------------------------------------------------
@dataclass
class Registry:
    entities: dict[str, Entity] = field(default_factory=dict)
    views: dict[str, FeatureView] = field(default_factory=dict)

    def entity(self, name: str) -> Entity:
        try:
            return self.entities[name]
        except KeyError:
            raise AppError(404, "entity_not_found", f"unknown entity '{name}'") from None

    def view(self, name: str) -> FeatureView:
        try:
            return self.views[name]
        except KeyError:
            raise AppError(404, "view_not_found", f"unknown feature view '{name}'") from None


@dataclass
class Selection:
    """Resolved feature references: views in first-use order, output names per (view, feature)."""

    entity: Entity
    views: list[FeatureView]
    features: dict[str, list[str]]  # view -> features, request order
    names: list[tuple[str, str, str]]  # (output name, view, feature), request order


def select_features(reg: Registry, entity_name: str, refs: Sequence[str], full_names: bool) -> Selection:
    entity = reg.entity(entity_name)
    views: dict[str, FeatureView] = {}
    per_view: dict[str, list[str]] = {}
    names: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for ref in refs:
        view_name, _, feature = ref.partition(":")
        view = reg.view(view_name)
        if view.entity != entity.name:
            raise AppError(422, "entity_mismatch",
                           f"view '{view.name}' describes entity '{view.entity}', not '{entity.name}'",
                           {"feature": ref})
        known = [f.name for f in view.features]
        wanted = known if not feature or feature == "*" else [feature]
        for name in wanted:
            if name not in known:
                raise AppError(422, "feature_not_found", f"view '{view.name}' has no feature '{name}'",
                               {"feature": ref, "known": known})
            if (view.name, name) in seen:
                continue
            seen.add((view.name, name))
            views.setdefault(view.name, view)
            per_view.setdefault(view.name, []).append(name)
            names.append((f"{view.name}:{name}" if full_names else name, view.name, name))
    outs = [n for n, _, _ in names]
    clashes = sorted({n for n in outs if outs.count(n) > 1})
    if clashes:
        raise AppError(422, "ambiguous_feature_names",
                       f"features {', '.join(clashes)} come from several views; set full_names: true",
                       {"features": clashes})
    return Selection(entity, list(views.values()), per_view, names)


def _entity_key(entity: Entity, value: Any) -> str:
    value = _plain(value)
    if entity.dtype == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"expected int, got {_type_name(value)}")
        try:
            as_int = int(value)
        except ValueError:
            raise ValueError(f"expected int, got {value!r}") from None
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected int, got a fraction")
        return str(as_int)
    if isinstance(value, str) and value:
        return value
    raise ValueError(f"expected a non-empty string, got {_type_name(value)}")


def _spec_dict(spec: EntitySpec | FeatureViewSpec) -> dict:
    cls = EntitySpec if isinstance(spec, EntitySpec) else FeatureViewSpec
    return cls.model_validate(spec.model_dump(include=set(cls.model_fields))).model_dump(mode="json")


def _diff(old: dict, new: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in new.items():
        if old.get(key) == value:
            continue
        if key == "features":
            before = {f["name"]: f for f in old.get(key, [])}
            after = {f["name"]: f for f in value}
            out[key] = {
                "added": [n for n in after if n not in before],
                "removed": [n for n in before if n not in after],
                "changed": [n for n in after if n in before and before[n] != after[n]],
            }
        else:
            out[key] = [old.get(key), value]
    return out


# -- the store ---------------------------------------------------------------------------------
class FeatureStore:
    """One per process. `redis` may be None for offline-only work (CLI, training)."""

    def __init__(self, engine: AsyncEngine, redis=None, *, prefix: str = "features:",
                 registry_cache_s: float = 5.0, expired_grace_s: int = 86400, max_online_ids: int = 1000,
                 max_historical_rows: int = 100_000, max_push_rows: int = 10_000,
                 materialize_lag_s: int = 0, pii_keys: str | None = None):
        self.engine = engine
        # PII features are sealed at rest (pii.py); keys default to FEATURES_PII_KEYS.
        self.pii = PiiCipher(pii_keys if pii_keys is not None else os.environ.get("FEATURES_PII_KEYS"))
        self.online_store = OnlineStore(redis, prefix, expired_grace_s) if redis is not None else None
        self.registry_cache_s = registry_cache_s
        self.max_online_ids = max_online_ids
        self.max_historical_rows = max_historical_rows
        self.max_push_rows = max_push_rows
        self.materialize_lag = timedelta(seconds=materialize_lag_s)
        self._registry: Registry | None = None
        self._loaded_at = 0.0
        self._registry_lock = asyncio.Lock()

    # -- registry ------------------------------------------------------------------------------
    async def registry(self, fresh: bool = False) -> Registry:
        """A snapshot cached for registry_cache_s (other replicas' changes show up within that)."""
        if not fresh and self._registry is not None and time.monotonic() - self._loaded_at < self.registry_cache_s:
            return self._registry
        async with self._registry_lock:
            if not fresh and self._registry is not None and \
                    time.monotonic() - self._loaded_at < self.registry_cache_s:
                return self._registry
            async with self.engine.connect() as conn:
                reg = await self._load_registry(conn)
            self._registry, self._loaded_at = reg, time.monotonic()
            return reg

    @staticmethod
    async def _load_registry(conn: AsyncConnection) -> Registry:
        reg = Registry()
        for row in (await conn.execute(select(entities).order_by(entities.c.name))).mappings():
            reg.entities[row["name"]] = Entity.model_validate(dict(row))
        for row in (await conn.execute(select(feature_views).order_by(feature_views.c.name))).mappings():
            reg.views[row["name"]] = FeatureView.model_validate(dict(row))
        return reg

    def _invalidate(self) -> None:
        self._registry = None

    async def apply(self, doc: RegistryDoc, dry_run: bool = False) -> list[Change]:
        """Create or update every object in `doc` (idempotent: same doc twice -> all unchanged).

        Objects absent from the doc are left alone. Runs in one transaction under an advisory
        lock, so concurrent applies (two replicas seeding) serialise.
        """
        changes: list[Change] = []
        async with self.engine.connect() as conn:
            tx = await conn.begin()
            try:
                await conn.execute(_lock_sql(), {"k": _REGISTRY_LOCK})
                reg = await self._load_registry(conn)
                for spec in doc.entities:
                    changes.append(await self._put(conn, reg, "entity", spec))
                for spec in doc.feature_views:
                    changes.append(await self._put(conn, reg, "feature_view", spec))
            except BaseException:
                await tx.rollback()
                raise
            if dry_run:
                await tx.rollback()
            else:
                await tx.commit()
                self._invalidate()
        return changes

    async def put(self, kind: str, spec: EntitySpec | FeatureViewSpec, create_only: bool = False) -> Change:
        async with self.engine.begin() as conn:
            await conn.execute(_lock_sql(), {"k": _REGISTRY_LOCK})
            reg = await self._load_registry(conn)
            existing = reg.entities if kind == "entity" else reg.views
            if create_only and spec.name in existing:
                raise AppError(409, "already_exists", f"{kind} '{spec.name}' already exists")
            change = await self._put(conn, reg, kind, spec)
        self._invalidate()
        return change

    async def _put(self, conn: AsyncConnection, reg: Registry, kind: str,
                   spec: EntitySpec | FeatureViewSpec) -> Change:
        table = entities if kind == "entity" else feature_views
        new = _spec_dict(spec)
        current = (reg.entities if kind == "entity" else reg.views).get(spec.name)
        if kind == "feature_view":
            self._check_view(reg, spec)  # type: ignore[arg-type]
        else:
            self._check_entity(reg, spec)  # type: ignore[arg-type]
        if current is not None:
            old = _spec_dict(current)
            if old == new:
                return Change(kind=kind, name=spec.name, action="unchanged", version=current.version)
            version = current.version + 1
            await conn.execute(update(table).where(table.c.name == spec.name)
                               .values(**new, version=version, updated_at=func.now()))
            action, diff = "updated", _diff(old, new)
        else:
            last = (await conn.execute(
                select(func.max(registry_history.c.version))
                .where(registry_history.c.kind == kind, registry_history.c.name == spec.name))).scalar()
            version = (last or 0) + 1
            await conn.execute(insert(table).values(**new, version=version))
            action, diff = "created", {}
        await conn.execute(insert(registry_history).values(kind=kind, name=spec.name, version=version,
                                                           action=action, spec=new))
        # Later objects in the same apply see this one (a view naming an entity created above).
        model = Entity if kind == "entity" else FeatureView
        (reg.entities if kind == "entity" else reg.views)[spec.name] = model(**new, version=version)
        return Change(kind=kind, name=spec.name, action=action, version=version, diff=diff)

    @staticmethod
    def _check_entity(reg: Registry, spec: EntitySpec) -> None:
        for view in reg.views.values():
            if view.entity == spec.name and spec.join_key in {f.name for f in view.features}:
                raise AppError(422, "invalid_spec",
                               f"join key '{spec.join_key}' clashes with a feature of view '{view.name}'")

    @staticmethod
    def _check_view(reg: Registry, spec: FeatureViewSpec) -> None:
        entity = reg.entities.get(spec.entity)
        if entity is None:
            raise AppError(422, "invalid_spec", f"view '{spec.name}' names unknown entity '{spec.entity}'",
                           {"view": spec.name, "entity": spec.entity})
        if entity.join_key in {f.name for f in spec.features}:
            raise AppError(422, "invalid_spec", f"feature '{entity.join_key}' clashes with the join key")
        current = reg.views.get(spec.name)
        if current is not None and current.entity != spec.entity:
            raise AppError(409, "entity_change",
                           f"view '{spec.name}' describes '{current.entity}'; delete it to change its entity")

    async def delete(self, kind: str, name: str) -> Change:
        """Delete an entity (no views may use it) or a view with its offline rows and online values."""
        async with self.engine.begin() as conn:
            await conn.execute(_lock_sql(), {"k": _REGISTRY_LOCK})
            reg = await self._load_registry(conn)
            obj = reg.entity(name) if kind == "entity" else reg.view(name)
            if kind == "entity":
                users = [v.name for v in reg.views.values() if v.entity == name]
                if users:
                    raise AppError(409, "entity_in_use", f"entity '{name}' is used by views: {', '.join(users)}",
                                   {"views": users})
                await conn.execute(delete(entities).where(entities.c.name == name))
            else:
                for table in (offline_rows, materialization_state, materialization_runs):
                    await conn.execute(delete(table).where(table.c.view == name))
                await conn.execute(delete(feature_views).where(feature_views.c.name == name))
            version = obj.version + 1
            await conn.execute(insert(registry_history).values(
                kind=kind, name=name, version=version, action="deleted", spec=_spec_dict(obj)))
        self._invalidate()
        if kind == "feature_view" and self.online_store is not None:
            await self.online_store.drop_view(name)
        return Change(kind=kind, name=name, action="deleted", version=version)

    async def history(self, kind: str, name: str) -> list[dict]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(registry_history).where(registry_history.c.kind == kind, registry_history.c.name == name)
                .order_by(registry_history.c.version))
            return [dict(r) for r in rows.mappings()]

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
                bad(i, extra, f"unknown field: view '{view.name}' has no feature '{extra}'", "extra_forbidden")
            try:
                key = _entity_key(entity, row[entity.join_key]) if entity.join_key in row else None
                if key is None:
                    bad(i, entity.join_key, "join key missing", "missing")
            except ValueError as exc:
                bad(i, entity.join_key, str(exc), "type_error")
                key = None
            try:
                raw_time = row.get("event_time")
                event_time = parse_time(raw_time) if raw_time is not None else default_time
                if event_time is None:
                    bad(i, "event_time", "event_time missing", "missing")
            except (ValueError, OverflowError, OSError) as exc:
                bad(i, "event_time", str(exc), "type_error")
                event_time = None
            values: dict[str, Any] = {}
            for name, dtype in dtypes.items():
                if name not in row:
                    bad(i, name, "feature missing (send null for an unknown value)", "missing")
                    continue
                try:
                    values[name] = check_value(dtype, _plain(row[name]))
                except ValueError as exc:
                    bad(i, name, str(exc), "type_error")
            if key is not None and event_time is not None and len(values) == len(dtypes):
                out.append(OnlineRow(key, to_ms(event_time), values))
        if errors:
            fields = sorted({f"{e['loc'][0]}[{e['loc'][1]}].{e['loc'][2]}" for e in errors[:20]})
            raise AppError(422, "validation_error", f"invalid rows for view '{view.name}': {', '.join(fields)}",
                           errors[:100])
        return out

    # -- writes --------------------------------------------------------------------------------
    async def _insert_offline(self, view: str, rows: Sequence[OnlineRow], source: str,
                              conn: AsyncConnection | None = None) -> int:
        if not rows:
            return 0

        async def run(c: AsyncConnection) -> None:
            for i in range(0, len(rows), _INSERT_CHUNK):
                await c.execute(insert(offline_rows), [
                    {"view": view, "entity_key": r.entity_key, "values": r.values, "source": source,
                     "event_time": datetime.fromtimestamp(r.event_ms / 1000, UTC)}
                    for r in rows[i:i + _INSERT_CHUNK]])

        if conn is not None:
            await run(conn)
        else:
            async with self.engine.begin() as c:
                await run(c)
        return len(rows)

    async def push(self, view_name: str, rows: Sequence[dict[str, Any]], to: str = "online_and_offline") -> dict:
        """Validate against the registry, append offline (the record), then write online."""
        if len(rows) > self.max_push_rows:
            raise AppError(413, "too_many_rows", f"at most {self.max_push_rows} rows per push")
        reg = await self.registry()
        view = reg.view(view_name)
        typed = self.seal_rows(view, self.validate_rows(reg, view, rows, default_time=utcnow()))
        offline = written = skipped = 0
        if to in ("online_and_offline", "offline"):
            offline = await self._insert_offline(view.name, typed, "push")
            m.ROWS_WRITTEN.labels(view.name, "offline", "push").inc(offline)
        if to in ("online_and_offline", "online"):
            written, skipped = await self._online().write(view.name, view.ttl_seconds, typed, to_ms(utcnow()))
            m.ROWS_WRITTEN.labels(view.name, "online", "push").inc(written)
        return {"view": view.name, "rows": len(typed), "offline_written": offline,
                "online_written": written, "online_skipped_older": skipped}

    async def ingest(self, view_name: str, records: Iterable[dict[str, Any]], source: str = "ingest",
                     chunk: int = _INSERT_CHUNK, progress: Callable[[int], None] | None = None) -> int:
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
        return await self._insert_offline(view.name, self.seal_rows(view, typed), source, conn)

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

    # -- reads ---------------------------------------------------------------------------------
    async def online(self, entity: str, ids: Sequence[str | int], features: Sequence[str],
                     full_names: bool = False) -> dict:
        """Latest values of `features` for `ids`, one pipelined Redis round trip for all of them."""
        if len(ids) > self.max_online_ids:
            raise AppError(413, "too_many_ids", f"at most {self.max_online_ids} ids per read")
        start = time.perf_counter()
        reg = await self.registry()
        sel = select_features(reg, entity, features, full_names)
        keys = []
        for i, raw in enumerate(ids):
            try:
                keys.append(_entity_key(sel.entity, raw))
            except ValueError as exc:
                raise AppError(422, "validation_error", f"ids[{i}]: {exc}",
                               [{"loc": ["ids", i], "msg": str(exc), "type": "type_error"}]) from None
        lookups = [OnlineLookup(v.name, key, sel.features[v.name]) for key in keys for v in sel.views]
        raw = await self._online().read(lookups)
        now_ms = to_ms(utcnow())
        counts: dict[tuple[str, str], int] = {}
        results = []
        per_entity = len(sel.views)
        for n, (raw_id, key) in enumerate(zip(ids, keys)):
            found: dict[tuple[str, str], tuple[Any, str, datetime | None]] = {}
            for j, view in enumerate(sel.views):
                ts, values = raw[n * per_entity + j]
                expired = ts is not None and view.ttl_seconds > 0 and now_ms - ts > view.ttl_seconds * 1000
                event_time = datetime.fromtimestamp(ts / 1000, UTC) if ts is not None else None
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
                keys.append(_entity_key(sel.entity, row["id"]))
                stamps.append(parse_time(row["timestamp"]))
            except (KeyError, ValueError) as exc:
                raise AppError(422, "validation_error", f"rows[{i}]: {exc}") from None
        params: dict[str, Any] = {"idx": list(range(len(rows))), "keys": keys, "ts": stamps}
        view_params = []
        for j, view in enumerate(sel.views):
            params[f"view{j}"], params[f"ttl{j}"] = view.name, view.ttl_seconds
            view_params.append((f"view{j}", f"ttl{j}"))
        async with self.engine.connect() as conn:
            result = (await conn.execute(text(pit_sql(view_params)), params)).all()
        out = []
        for row, src, ts in zip(result, rows, stamps):
            found = {}
            for j, view in enumerate(sel.views):
                event_time, status, values = row[1 + 3 * j], row[2 + 3 * j], row[3 + 3 * j]
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
        """Copy the newest offline value per entity in a window of event time to the online store.

        No start and no end: incremental — from where the last incremental run stopped (late rows
        ingested since then included) to now, and remember the new position. With start and/or
        end: that window only; the incremental position is untouched. Idempotent either way: the
        online write keeps the newer event, so re-running writes nothing new.
        """
        reg = await self.registry(fresh=True)
        names = list(views) if views else list(reg.views)
        targets = [reg.view(n) for n in names]
        incremental = start is None and end is None
        results = []
        for view in targets:
            results.append(await self._materialize_view(view, start and parse_time(start),
                                                        end and parse_time(end), incremental))
            if progress:
                progress(results[-1])
        return results

    async def _materialize_view(self, view: FeatureView, start: datetime | None, end: datetime | None,
                                incremental: bool) -> dict:
        online = self._online()
        t0 = time.perf_counter()
        started = utcnow()
        async with self.engine.connect() as conn, conn.begin():
            # One run per view at a time (pipeline schedule and admin call may overlap).
            await conn.execute(_lock_sql(), {"k": f"features.materialize:{view.name}"})
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
            entities_n = written = 0
            now_ms = to_ms(utcnow())
            result = await conn.stream(text(sql), params)
            async for part in result.partitions(2000):
                rows = [OnlineRow(r.entity_key, to_ms(r.event_time), r.values) for r in part]
                w, _ = await online.write(view.name, view.ttl_seconds, rows, now_ms)
                entities_n += len(rows)
                written += w
            if incremental:
                values = {"event_time_to": end, "created_to": horizon - self.materialize_lag,
                          "updated_at": func.now()}
                await conn.execute(pg_insert(materialization_state).values(view=view.name, **values)
                                   .on_conflict_do_update(index_elements=["view"], set_=values))
            await conn.execute(insert(materialization_runs).values(
                view=view.name, incremental=incremental, window_start=start, window_end=end,
                entities=entities_n, written=written, started_at=started, finished_at=func.clock_timestamp()))
        m.ROWS_WRITTEN.labels(view.name, "online", "materialize").inc(written)
        m.MATERIALIZE_SECONDS.labels(view.name).observe(time.perf_counter() - t0)
        log.info("materialised %s: %d entities, %d written (%s .. %s)", view.name, entities_n, written, start, end)
        return {"view": view.name, "incremental": incremental, "start": start, "end": end,
                "entities": entities_n, "written": written}

    # -- stats and freshness -------------------------------------------------------------------
    async def newest_online(self, views: Sequence[str]) -> dict[str, datetime | None]:
        raw = await self._online().newest(views)
        return {v: (datetime.fromtimestamp(ms / 1000, UTC) if ms is not None else None)
                for v, ms in raw.items()}

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
        async with self.engine.connect() as conn:
            offline = {r.view: r for r in await conn.execute(
                select(offline_rows.c.view, func.count().label("n"), func.max(offline_rows.c.event_time).label("newest"))
                .group_by(offline_rows.c.view))}
            state = {r.view: r.event_time_to for r in await conn.execute(select(materialization_state))}
            last_runs = {}
            for r in (await conn.execute(text(
                    "SELECT DISTINCT ON (view) view, incremental, window_start, window_end, entities, written, "
                    "started_at, finished_at FROM features.materialization_runs ORDER BY view, id DESC"))).mappings():
                last_runs[r["view"]] = {k: v for k, v in r.items() if k != "view"}
        newest = await self.newest_online(list(reg.views)) if self.online_store is not None else {}
        now = utcnow()
        views = []
        for view in reg.views.values():
            on = newest.get(view.name)
            views.append({
                "view": view.name, "version": view.version, "ttl_seconds": view.ttl_seconds,
                "offline_rows": offline[view.name].n if view.name in offline else 0,
                "offline_newest_event_time": offline[view.name].newest if view.name in offline else None,
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

    # -- demo seed -----------------------------------------------------------------------------
    async def seed_demo(self, customers: int = 1000, snapshots: int = 4) -> dict:
        """Apply defaults.yaml, seed synthetic history for the demo view if it has none, materialise.

        Idempotent and safe with several replicas starting at once (a session advisory lock).
        Seeded-only history older than half the TTL gets a fresh snapshot, so the demo keeps
        working after a restart days later.
        """
        report: dict[str, Any] = {"seeded_rows": 0}
        async with self.engine.connect() as lock_conn:
            await lock_conn.execute(_lock_sql(session=True), {"k": _SEED_LOCK})
            await lock_conn.commit()
            try:
                changes = await self.apply(load_doc(DEFAULTS_FILE))
                report["changes"] = [c.model_dump() for c in changes if c.action != "unchanged"]
                view = (await self.registry(fresh=True)).view(DEMO_VIEW)
                async with self.engine.connect() as conn:
                    newest = (await conn.execute(select(func.max(offline_rows.c.event_time))
                                                 .where(offline_rows.c.view == view.name))).scalar()
                    stale = newest is not None and view.ttl_seconds > 0 and \
                        utcnow() - newest > timedelta(seconds=view.ttl_seconds / 2)
                    only_seed = stale and not (await conn.execute(text(
                        "SELECT EXISTS (SELECT 1 FROM features.offline_rows WHERE view = :v AND source <> :s)"),
                        {"v": view.name, "s": DEMO_SOURCE})).scalar()
                if newest is None:
                    report["seeded_rows"] = await self._insert_offline(
                        view.name, demo_rows(customers, snapshots, utcnow()), DEMO_SOURCE)
                elif only_seed:
                    report["seeded_rows"] = await self._insert_offline(
                        view.name, demo_rows(customers, 1, utcnow()), DEMO_SOURCE)
                if self.online_store is not None:
                    report["materialized"] = await self.materialize([view.name])
                    probe = await self.online_store.read([OnlineLookup(view.name, demo_id(0), ["_ts"])])
                    if probe[0][0] is None:  # Redis lost its data: copy the whole history back
                        report["rematerialized"] = await self.materialize(
                            [view.name], start=datetime(1970, 1, 1, tzinfo=UTC))
            finally:
                await lock_conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": _SEED_LOCK})
                await lock_conn.commit()
        return report


def _shape(raw_id: Any, sel: Selection, found: dict) -> dict:
    values, statuses, times = {}, {}, {}
    for out_name, view, fname in sel.names:
        value, status, event_time = found[(view, fname)]
        values[out_name], statuses[out_name], times[out_name] = value, status, event_time
    return {"id": raw_id, "values": values, "statuses": statuses, "event_times": times}


# -- the declarative file and the demo data ----------------------------------------------------
def load_doc(path: str | Path) -> RegistryDoc:
    """Read a declarative registry file (YAML, or JSON which YAML also reads)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return RegistryDoc.model_validate(data)


def demo_id(i: int) -> str:
    return f"C{i + 1:04d}"


def demo_rows(customers: int, snapshots: int, now: datetime) -> list[OnlineRow]:
    """Daily snapshots of the synthetic customer features, the last one at `now`."""
    from services.demo.synthetic import CUSTOMER_FEATURES, customer_history

    history = customer_history(customers, snapshots)
    rows = []
    for k, snap in enumerate(history):
        event_ms = to_ms(now - timedelta(days=len(history) - 1 - k))
        for i in range(customers):
            rows.append(OnlineRow(demo_id(i), event_ms,
                                  {f: round(float(snap[f][i]), 4) for f in CUSTOMER_FEATURES}))
    return rows


# -- module-level entry points (pipeline, scripts) ---------------------------------------------
async def materialize(engine: AsyncEngine, redis, views: Sequence[str] | None = None,
                      start: datetime | None = None, end: datetime | None = None,
                      prefix: str = "features:") -> list[dict]:
    """Materialise without an app (see FeatureStore.materialize)."""
    return await FeatureStore(engine, redis, prefix=prefix).materialize(views, start, end)


async def get_historical_features(engine: AsyncEngine, entity: str, rows: Sequence[dict[str, Any]],
                                  features: Sequence[str], full_names: bool = False) -> dict:
    """Point-in-time retrieval without an app; over HTTP use services.features.client."""
    return await FeatureStore(engine, None).historical(entity, rows, features, full_names)
