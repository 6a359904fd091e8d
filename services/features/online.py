"""The online store: the latest value per (view, entity) in Redis.

Layout (keys prefixed `features:`):

    features:online:<view>:<entity key>   hash  _ts -> event time (epoch ms),
                                                _v -> "<offline created_at µs>:<offline row id>",
                                                <feature> -> JSON value
    features:newest:<view>                string  newest event time written online (epoch ms)
    features:ttl:<view>                   string  the TTL the view's keys were last expired with

A Lua script writes a hash only when its (event time, created_at, id) is newer than the stored
one: an older event never replaces a newer one, and at one event time the row the offline store
committed last wins, whatever order pushes and materialisation runs arrive in. Expiry is only
housekeeping (reads judge TTL against the view's current TTL); it is refreshed on every write,
identical ones included, and re-set for every key when a view's TTL changes.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

log = logging.getLogger("aistack.features")

META = ("_ts", "_v")  # hash fields that are not features (schemas.RESERVED keeps them free)
WRITTEN, OLDER, UNCHANGED = 1, 0, 2

# KEYS[1] the entity's hash. ARGV: event ms, created µs, row id, expire-at ms (0: never), then
# field/value pairs. Returns WRITTEN, OLDER (a newer row is stored) or UNCHANGED (same values).
_WRITE = """
local function expire()
  if tonumber(ARGV[4]) > 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[4]) else redis.call('PERSIST', KEYS[1]) end
end
local cur = redis.call('HGET', KEYS[1], '_ts')
if cur then
  local ts, new_ts = tonumber(cur), tonumber(ARGV[1])
  local c, i = -1, -1
  local v = redis.call('HGET', KEYS[1], '_v')
  if v then
    local a, b = string.match(v, '^(%-?%d+):(%-?%d+)$')
    if a then c, i = tonumber(a), tonumber(b) end
  end
  local nc, ni = tonumber(ARGV[2]), tonumber(ARGV[3])
  if ts > new_ts or (ts == new_ts and (c > nc or (c == nc and i > ni))) then return 0 end
  if ts == new_ts then
    local same = true
    for k = 5, #ARGV, 2 do
      if redis.call('HGET', KEYS[1], ARGV[k]) ~= ARGV[k + 1] then same = false break end
    end
    if same and redis.call('HLEN', KEYS[1]) == (#ARGV - 4) / 2 + 2 then
      redis.call('HSET', KEYS[1], '_v', ARGV[2] .. ':' .. ARGV[3])
      expire()
      return 2
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '_ts', ARGV[1], '_v', ARGV[2] .. ':' .. ARGV[3], unpack(ARGV, 5))
expire()
return 1
"""
# KEYS[1] a view's newest-event key; ARGV[1] event ms. Keeps the maximum.
_SET_MAX = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""
# KEYS: entity hashes. ARGV: ttl ms (0: never), now ms, grace ms. Re-sets each key's expiry.
_REEXPIRE = """
local ttl, now, grace = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  local ts = redis.call('HGET', key, '_ts')
  if ts then
    if ttl <= 0 then redis.call('PERSIST', key)
    else redis.call('PEXPIREAT', key, math.max(tonumber(ts) + ttl, now) + grace) end
  end
end
return #KEYS
"""


@dataclass(frozen=True)
class OnlineRow:
    """A row on its way online. created_us/row_id: the offline row's version (ties at one event time)."""

    entity_key: str
    event_ms: int
    values: dict[str, Any]
    created_us: int = 0
    row_id: int = 0


@dataclass(frozen=True)
class OnlineLookup:
    view: str
    entity_key: str
    features: Sequence[str]


@dataclass
class WriteCounts:
    written: int = 0
    older: int = 0  # a newer event (or a later row at the same event time) is stored
    unchanged: int = 0  # the same values at the same event time are stored
    invalid: int = 0  # not encodable (rows stored before today's bounds); logged, never written
    results: list[int | None] | None = None  # per row: WRITTEN / OLDER / UNCHANGED / None (invalid)


class OnlineStore:
    def __init__(self, redis: aioredis.Redis, prefix: str = "features:", expired_grace_s: int = 86400,
                 batch: int = 1000):
        self.redis = redis
        self.prefix = prefix
        self.grace_ms = expired_grace_s * 1000
        self.batch = batch
        self._write = redis.register_script(_WRITE)
        self._set_max = redis.register_script(_SET_MAX)
        self._reexpire = redis.register_script(_REEXPIRE)

    def key(self, view: str, entity_key: str) -> str:
        return f"{self.prefix}online:{view}:{entity_key}"

    def newest_key(self, view: str) -> str:
        return f"{self.prefix}newest:{view}"

    def ttl_key(self, view: str) -> str:
        return f"{self.prefix}ttl:{view}"

    async def applied_ttls(self, views: Sequence[str]) -> dict[str, int | None]:
        """The TTL each view's keys were last expired with (None: not recorded)."""
        if not views:
            return {}
        raw = await self.redis.mget([self.ttl_key(v) for v in views])
        return {v: (int(r) if r is not None else None) for v, r in zip(views, raw)}

    async def set_applied_ttl(self, view: str, ttl_s: int) -> None:
        await self.redis.set(self.ttl_key(view), ttl_s)

    def _expire_at(self, event_ms: int, ttl_s: int, now_ms: int) -> int:
        """Keep an expired value readable (as 'expired') for a grace period, then let Redis drop it."""
        if ttl_s <= 0:
            return 0
        return max(event_ms + ttl_s * 1000, now_ms) + self.grace_ms

    async def write(self, view: str, ttl_s: int, rows: Iterable[OnlineRow], now_ms: int) -> WriteCounts:
        """Write rows (pipelined, in batches) where they are newer than what is stored."""
        counts = WriteCounts(results=[])
        newest = None
        chunk: list[tuple[OnlineRow, list[Any]]] = []

        async def flush() -> None:
            nonlocal newest
            if not chunk:
                return
            pipe = self.redis.pipeline(transaction=False)
            for row, args in chunk:
                await self._write(keys=[self.key(view, row.entity_key)], args=args, client=pipe)
            for (row, _), result in zip(chunk, await pipe.execute()):
                result = int(result)
                counts.results.append(result)
                if result == WRITTEN:
                    counts.written += 1
                    newest = row.event_ms if newest is None else max(newest, row.event_ms)
                elif result == UNCHANGED:
                    counts.unchanged += 1
                else:
                    counts.older += 1
            chunk.clear()

        for row in rows:
            try:
                args: list[Any] = [row.event_ms, row.created_us, row.row_id,
                                   self._expire_at(row.event_ms, ttl_s, now_ms)]
                for name, value in row.values.items():
                    args += [name, orjson.dumps(value)]
            except (TypeError, orjson.JSONEncodeError) as exc:
                await flush()  # keep results in row order
                counts.invalid += 1
                counts.results.append(None)
                log.warning("view %s: entity %s at %d ms cannot be stored online (%s); skipped",
                            view, row.entity_key[:64], row.event_ms, exc)
                continue
            chunk.append((row, args))
            if len(chunk) >= self.batch:
                await flush()
        await flush()
        if newest is not None:
            await self._set_max(keys=[self.newest_key(view)], args=[newest])
        return counts

    async def reexpire(self, view: str, ttl_s: int, now_ms: int) -> int:
        """Apply a view's new TTL to every stored key of it (0: keys never expire)."""
        n = 0
        keys: list[str] = []
        async for key in self.redis.scan_iter(match=f"{self.prefix}online:{view}:*", count=1000):
            keys.append(key)
            if len(keys) >= 500:
                n += int(await self._reexpire(keys=keys, args=[ttl_s * 1000, now_ms, self.grace_ms]))
                keys = []
        if keys:
            n += int(await self._reexpire(keys=keys, args=[ttl_s * 1000, now_ms, self.grace_ms]))
        return n

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
        await self.redis.unlink(self.newest_key(view), self.ttl_key(view))
        return n
