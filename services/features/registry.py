"""The feature registry: entities and feature views in Postgres, versioned, with a cached snapshot.

Feast's Registry: what exists and how it is typed. Writes run under an advisory lock, so
concurrent applies (two replicas seeding) serialise; every version lands in registry_history.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.chassis.errors import AppError

from .models import (
    entities,
    feature_views,
    materialization_runs,
    materialization_state,
    offline_rows,
    registry_history,
)
from .schemas import Change, Entity, EntitySpec, FeatureView, FeatureViewSpec, RegistryDoc

_REGISTRY_LOCK = "features.registry"


def lock_sql(session: bool = False) -> Any:
    fn = "pg_advisory_lock" if session else "pg_advisory_xact_lock"
    return text(f"SELECT {fn}(hashtext(:k))")


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




class RegistryStore:
    """Reads and writes the registry; `snapshot()` is cached for `cache_s` (other replicas'
    changes show up within that)."""

    def __init__(self, engine: AsyncEngine, cache_s: float = 5.0):
        self.engine = engine
        self.registry_cache_s = cache_s
        self._registry: Registry | None = None
        self._loaded_at = 0.0
        self._registry_lock = asyncio.Lock()

    async def snapshot(self, fresh: bool = False) -> Registry:
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

    def invalidate(self) -> None:
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
                await conn.execute(lock_sql(), {"k": _REGISTRY_LOCK})
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
                self.invalidate()
        return changes

    async def put(self, kind: str, spec: EntitySpec | FeatureViewSpec, create_only: bool = False) -> Change:
        async with self.engine.begin() as conn:
            await conn.execute(lock_sql(), {"k": _REGISTRY_LOCK})
            reg = await self._load_registry(conn)
            existing = reg.entities if kind == "entity" else reg.views
            if create_only and spec.name in existing:
                raise AppError(409, "already_exists", f"{kind} '{spec.name}' already exists")
            change = await self._put(conn, reg, kind, spec)
        self.invalidate()
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
            if kind == "feature_view" and _ttl_raised(old["ttl_seconds"], new["ttl_seconds"]):
                # Values dropped online under the old TTL are live again: the next incremental
                # run starts from scratch and copies them back.
                await conn.execute(delete(materialization_state).where(materialization_state.c.view == spec.name))
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
        """Delete an entity (no views may use it) or a view with its offline rows (the facade drops
        its online values)."""
        async with self.engine.begin() as conn:
            await conn.execute(lock_sql(), {"k": _REGISTRY_LOCK})
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
        self.invalidate()
        return Change(kind=kind, name=name, action="deleted", version=version)

    async def history(self, kind: str, name: str) -> list[dict]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(registry_history).where(registry_history.c.kind == kind, registry_history.c.name == name)
                .order_by(registry_history.c.version))
            return [dict(r) for r in rows.mappings()]


def _ttl_raised(old: int, new: int) -> bool:
    """0 means never expire: the largest TTL of all."""
    return old > 0 and (new == 0 or new > old)


def load_doc(path: str | Path) -> RegistryDoc:
    """Read a declarative registry file (YAML, or JSON which YAML also reads)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return RegistryDoc.model_validate(data)
