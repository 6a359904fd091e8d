"""Persistence: the online store in Redis and the SQL of the offline store and registry.

Online layout (one Redis hash per view and entity, keys prefixed `features:`):

    features:online:<view>:<entity key>   hash  _ts -> event time (epoch ms), <feature> -> JSON value
    features:newest:<view>                string  newest event time written online (epoch ms)

A Lua script writes a hash only when its event time is >= the stored one, so an older event
never replaces a newer one, whatever order pushes and materialisation runs arrive in.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import redis.asyncio as aioredis

# KEYS[1] the entity's hash. ARGV: event ms, expire-at ms (0: never), then field/value pairs.
_WRITE = """
local cur = redis.call('HGET', KEYS[1], '_ts')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
if cur and tonumber(cur) == tonumber(ARGV[1]) then
  -- Same event again: a no-op when nothing changed (re-runs write nothing), else a correction.
  local same = true
  for i = 3, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then same = false break end
  end
  if same and redis.call('HLEN', KEYS[1]) == (#ARGV - 2) / 2 + 1 then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_ts', ARGV[1], unpack(ARGV, 3))
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
return 1
"""
# KEYS[1] a view's newest-event key; ARGV[1] event ms. Keeps the maximum.
_SET_MAX = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""


def to_ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


@dataclass(frozen=True)
class OnlineRow:
    entity_key: str
    event_ms: int
    values: dict[str, Any]


@dataclass(frozen=True)
class OnlineLookup:
    view: str
    entity_key: str
    features: Sequence[str]


class OnlineStore:
    def __init__(self, redis: aioredis.Redis, prefix: str = "features:", expired_grace_s: int = 86400,
                 batch: int = 1000):
        self.redis = redis
        self.prefix = prefix
        self.grace_ms = expired_grace_s * 1000
        self.batch = batch
        self._write = redis.register_script(_WRITE)
        self._set_max = redis.register_script(_SET_MAX)

    def key(self, view: str, entity_key: str) -> str:
        return f"{self.prefix}online:{view}:{entity_key}"

    def newest_key(self, view: str) -> str:
        return f"{self.prefix}newest:{view}"

    def _expire_at(self, event_ms: int, ttl_s: int, now_ms: int) -> int:
        """Keep an expired value readable (as 'expired') for a grace period, then let Redis drop it."""
        if ttl_s <= 0:
            return 0
        return max(event_ms + ttl_s * 1000, now_ms) + self.grace_ms

    async def write(self, view: str, ttl_s: int, rows: Iterable[OnlineRow], now_ms: int) -> tuple[int, int]:
        """Write rows (pipelined, in batches); returns (written, skipped: a newer or the same event is stored)."""
        written = skipped = 0
        newest = None
        chunk: list[OnlineRow] = []

        async def flush() -> None:
            nonlocal written, skipped
            if not chunk:
                return
            pipe = self.redis.pipeline(transaction=False)
            for row in chunk:
                args: list[Any] = [row.event_ms, self._expire_at(row.event_ms, ttl_s, now_ms)]
                for name, value in row.values.items():
                    args += [name, orjson.dumps(value)]
                await self._write(keys=[self.key(view, row.entity_key)], args=args, client=pipe)
            for result in await pipe.execute():
                if int(result):
                    written += 1
                else:
                    skipped += 1
            chunk.clear()

        for row in rows:
            newest = row.event_ms if newest is None else max(newest, row.event_ms)
            chunk.append(row)
            if len(chunk) >= self.batch:
                await flush()
        await flush()
        if newest is not None:
            await self._set_max(keys=[self.newest_key(view)], args=[newest])
        return written, skipped

    async def read(self, lookups: Sequence[OnlineLookup]) -> list[tuple[int | None, list[Any]]]:
        """One pipelined round trip: per lookup, (event ms or None, decoded values in feature order)."""
        pipe = self.redis.pipeline(transaction=False)
        for lk in lookups:
            pipe.hmget(self.key(lk.view, lk.entity_key), ["_ts", *lk.features])
        out = []
        for raw in await pipe.execute():
            ts = int(raw[0]) if raw[0] is not None else None
            out.append((ts, [orjson.loads(v) if v is not None else None for v in raw[1:]]))
        return out

    async def newest(self, views: Sequence[str]) -> dict[str, int | None]:
        if not views:
            return {}
        raw = await self.redis.mget([self.newest_key(v) for v in views])
        return {v: (int(r) if r is not None else None) for v, r in zip(views, raw)}

    async def drop_view(self, view: str) -> int:
        n = 0
        async for key in self.redis.scan_iter(match=f"{self.prefix}online:{view}:*", count=1000):
            n += await self.redis.unlink(key)
        await self.redis.unlink(self.newest_key(view))
        return n


# -- offline SQL ------------------------------------------------------------------------------
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
    return ("SELECT DISTINCT ON (entity_key) entity_key, event_time, values FROM features.offline_rows "
            "WHERE " + " AND ".join(where) +
            " ORDER BY entity_key, event_time DESC, created_at DESC, id DESC")
