"""PII key rotation and data-subject access/erasure for the feature store (docs/privacy.md).

Data subjects reach the feature store only through linked entities: auth keeps which entity ids
(e.g. customer C0042) belong to a user and asks here, over the internal API, for everything stored
about those ids (offline rows of every view of the entity, online values) or for its erasure.
"""
from __future__ import annotations

import logging
from typing import Any

import orjson
from sqlalchemy import text

from services.chassis.errors import AppError

from .dtypes import entity_key
from .online import META
from .pii import PiiKeyError
from .service import FeatureStore

log = logging.getLogger("aistack.features.privacy")

# KEYS[1] an online hash; ARGV[1] the event ms it was read at, then field/value pairs. Writes only if
# no newer event replaced the hash meanwhile (its TTL is kept: HSET does not touch it).
_RESEAL = """
if redis.call('HGET', KEYS[1], '_ts') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


async def rotate_pii(store: FeatureStore, batch: int = 1000) -> dict:
    """Re-encrypt every PII value with the current key (and seal plain ones). Idempotent, resumable."""
    reg = await store.registry(fresh=True)
    pii_views = {v.name: {f.name for f in v.features if f.pii} for v in reg.views.values()}
    pii_views = {k: v for k, v in pii_views.items() if v}
    report: dict[str, Any] = {"views": sorted(pii_views), "offline_rows": 0, "online_values": 0}
    if not pii_views:
        return report
    try:
        after = 0
        while True:
            async with store.engine.begin() as conn:
                rows = (await conn.execute(text(
                    "SELECT id, view, values FROM features.offline_rows WHERE view = ANY(CAST(:views AS text[])) "
                    "AND id > :after ORDER BY id LIMIT :n"), {"views": list(pii_views), "after": after, "n": batch})).all()
                if not rows:
                    break
                updates = []
                for row_id, view, values in rows:
                    new = _resealed(store, values or {}, pii_views[view])
                    if new is not None:
                        updates.append({"id": row_id, "values": orjson.dumps(new).decode()})
                if updates:
                    await conn.execute(text("UPDATE features.offline_rows SET values = CAST(:values AS jsonb) "
                                            "WHERE id = :id"), updates)
                report["offline_rows"] += len(updates)
                after = rows[-1][0]
        if store.online_store is not None:
            online = store.online_store
            reseal = online.redis.register_script(_RESEAL)
            for view, fields in pii_views.items():
                names = sorted(fields)
                async for key in online.redis.scan_iter(match=f"{online.prefix}online:{view}:*", count=1000):
                    raw = await online.redis.hmget(key, ["_ts", *names])
                    if raw[0] is None:
                        continue
                    args: list[Any] = [raw[0]]
                    for name, value in zip(names, raw[1:]):
                        if value is None:
                            continue
                        new = store.pii.reseal(orjson.loads(value))
                        if new is not None:
                            args += [name, orjson.dumps(new)]
                    if len(args) > 1 and int(await reseal(keys=[key], args=args)):
                        report["online_values"] += (len(args) - 1) // 2
    except PiiKeyError as exc:
        raise AppError(409, "pii_key_missing", str(exc)) from None
    log.info("PII values re-encrypted: %d offline rows, %d online values",
             report["offline_rows"], report["online_values"])
    return report


def _resealed(store: FeatureStore, values: dict, fields: set[str]) -> dict | None:
    changed = False
    out = dict(values)
    for name in fields:
        if name in out:
            new = store.pii.reseal(out[name])
            if new is not None:
                out[name], changed = new, True
    return out if changed else None


async def _keys(store: FeatureStore, entity: str, ids: list[str]):
    reg = await store.registry(fresh=True)
    ent = reg.entity(entity)
    keys = []
    for raw in ids:
        try:
            keys.append(entity_key(ent.dtype, raw))
        except ValueError as exc:
            raise AppError(422, "validation_error", f"entity id: {exc}") from None
    views = [v.name for v in reg.views.values() if v.entity == ent.name]
    return ent, keys, views


async def subject_export(store: FeatureStore, entity: str, ids: list[str]) -> dict:
    """Everything stored about these entity ids: offline rows and online values, decrypted."""
    ent, keys, views = await _keys(store, entity, ids)
    out: dict[str, Any] = {"entity": ent.name, "ids": keys, "offline": [], "online": []}
    if not keys or not views:
        return out
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT view, entity_key, event_time, created_at, source, values FROM features.offline_rows "
            "WHERE view = ANY(CAST(:views AS text[])) AND entity_key = ANY(CAST(:keys AS text[])) "
            "ORDER BY view, entity_key, event_time"), {"views": views, "keys": keys})).mappings().all()
    for r in rows:
        out["offline"].append({**{k: r[k] for k in ("view", "entity_key", "event_time", "created_at", "source")},
                               "values": store.pii.open_values(r["values"])})
    if store.online_store is not None:
        online = store.online_store
        for view in views:
            for key in keys:
                raw = await online.redis.hgetall(online.key(view, key))
                if not raw:
                    continue
                values = {k.decode(): store.pii.open(orjson.loads(v)) for k, v in raw.items() if k.decode() not in META}
                out["online"].append({"view": view, "entity_key": key, "event_ms": int(raw.get(b"_ts", 0)),
                                      "values": values})
    return out


async def subject_erase(store: FeatureStore, entity: str, ids: list[str]) -> dict:
    """Delete the offline rows and online values of these entity ids (idempotent); counts."""
    ent, keys, views = await _keys(store, entity, ids)
    if not keys or not views:
        return {"entity": ent.name, "offline_rows": 0, "online_keys": 0}
    async with store.engine.begin() as conn:
        deleted = (await conn.execute(text(
            "DELETE FROM features.offline_rows WHERE view = ANY(CAST(:views AS text[])) "
            "AND entity_key = ANY(CAST(:keys AS text[]))"), {"views": views, "keys": keys})).rowcount
    online_n = 0
    if store.online_store is not None:
        online = store.online_store
        online_n = await online.redis.unlink(*[online.key(v, k) for v in views for k in keys])
    return {"entity": ent.name, "offline_rows": deleted, "online_keys": online_n}
