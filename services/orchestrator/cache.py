"""Response cache in Redis with request coalescing.

The cache key names an answer: sha256 of canonical JSON of (model, the answer's label, and per
version its content digest and the inputs as that version will see them: only its declared
inputs, each cast to its declared type, FP32 values rounded to FP32). `250` and `250.0` are one
key; a version re-registered with other weights (another manifest digest) is another.

Coalescing: concurrent identical requests share one computation, a future per *flight key* in
this process. The flight key is the cache key plus everything that makes the computation differ:
pinned or routed, the fallback version a routed request may use, the policy's timeout. Across
replicas a short Redis lock per cache key makes others wait for the first one's stored result;
only a normal answer is stored, so a fallback answer is never shared through Redis either.
Redis trouble never fails a prediction: the cache steps aside.

One round trip per lookup: an entry is a hash {version, rows (JSON)}, read by one Lua script that,
on a hit, also runs the caller's `on_hit` commands (the prediction log and usage counters) with the
stored rows JSON in place of ROWS, and on a miss takes the lock. So a hit costs one EVALSHA, and
its log entry is written, atomically with the read, before the answer leaves.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter

from services.chassis.errors import AppError

log = logging.getLogger("aistack.orchestrator.cache")

CACHE = Counter("aistack_orchestrator_cache_requests_total", "Response cache lookups by result",
                ["model", "result"])
PREFIX = "orchestrator:cache"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# Placeholder in an on_hit command: replaced by the cached rows JSON inside the script.
ROWS = "\x00rows"
# KEYS: data, lock. ARGV: lock token ('' = only report whether the lock is held), lock ms, then the
# on_hit commands as <argc> <arg>... each. Returns {1, version, rows} on a hit, {0, locked|held}.
# A key of another type (a string entry written before entries were hashes) is a miss, overwritten.
_LOOKUP = """
if redis.call('TYPE', KEYS[1])['ok'] == 'hash' then
  local hit = redis.call('HMGET', KEYS[1], 'version', 'rows')
  if hit[1] and hit[2] then
    local i = 3
    while i <= #ARGV do
      local n, args = tonumber(ARGV[i]), {}
      for j = 1, n do
        local a = ARGV[i + j]
        if a == '\0rows' then a = hit[2] end
        args[j] = a
      end
      redis.call(unpack(args))
      i = i + n + 1
    end
    return {1, hit[1], hit[2]}
  end
end
if ARGV[1] ~= '' then
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0, 1} end
  return {0, 0}
end
return {0, redis.call('EXISTS', KEYS[2])}
"""
# Floats the model reads at lower precision: equal once cast means the same answer.
_PACK = {"FP32": "f", "FP16": "e"}


def canonical_inputs(body: dict) -> list:
    """A v2 request's inputs (model.client.encode_rows: declared inputs only, already cast to their
    declared types) with FP32/FP16 data rounded to that precision: what the model actually reads."""
    out = []
    for tensor in body["inputs"]:
        data, code = tensor["data"], _PACK.get(tensor["datatype"])
        if code:
            try:
                data = list(struct.unpack(f"<{len(data)}{code}", struct.pack(f"<{len(data)}{code}", *data)))
            except (OverflowError, struct.error):
                raise AppError(422, "invalid_feature", f"feature '{tensor['name']}' is out of the "
                               f"{tensor['datatype']} range", {"feature": tensor["name"]}) from None
        out.append([tensor["name"], tensor["datatype"], tensor["shape"], data])
    return out


def cache_key(model: str, label: str, parts: list[tuple[str, str, list]]) -> str:
    """`parts`: (version, content digest, canonical inputs) for each version behind the answer."""
    canonical = orjson.dumps({"model": model, "answer": label, "parts": parts},
                             option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    return hashlib.sha256(canonical).hexdigest()


def flight_key(key: str, *, pinned: bool, fallback: str | None, timeout_s: float) -> str:
    """Requests share an in-flight computation only when it would be the same computation."""
    return f"{key}|{'pinned' if pinned else 'routed'}|fallback={fallback or ''}|timeout={timeout_s!r}"


class ResponseCache:
    def __init__(self, redis: aioredis.Redis, lock_ms: int = 5000, poll_s: float = 0.01):
        self.redis = redis
        self.lock_ms, self.poll_s = lock_ms, poll_s
        self._inflight: dict[str, asyncio.Future] = {}
        self._lookup = redis.register_script(_LOOKUP)

    async def get_or_compute(self, model: str, key: str, ttl_s: int, compute: Callable[[], Awaitable[Any]],
                             bypass: bool = False, flight: str | None = None,
                             on_hit: list[tuple] = ()) -> tuple[Any, str]:
        """Return (value, result) where result is hit, miss, coalesced, bypass or error. A value is
        {"version", "rows", ...}. `flight` (default: the key) groups concurrent callers that may share
        one computation; a value with `"fallback": True` is returned to them but never stored.
        `on_hit`: Redis commands run in the lookup's own script when, and only when, the result is
        "hit" (ROWS stands for the stored rows JSON)."""
        if bypass or ttl_s <= 0:
            CACHE.labels(model, "bypass").inc()
            return await compute(), "bypass"
        flight = flight or key
        if flight in self._inflight:
            CACHE.labels(model, "coalesced").inc()
            return await asyncio.shield(self._inflight[flight]), "coalesced"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[flight] = future
        try:
            value, result = await self._lookup_or_compute(model, key, ttl_s, compute, on_hit)
            future.set_result(value)
            CACHE.labels(model, result).inc()
            return value, result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[flight]

    async def _lookup_or_compute(self, model, key, ttl_s, compute, on_hit=()) -> tuple[Any, str]:
        data_key, lock_key = f"{PREFIX}:{model}:{key}", f"{PREFIX}:lock:{key}"
        token = secrets.token_hex(8)
        argv = [token, self.lock_ms]
        for command in on_hit:
            argv += [len(command), *command]
        try:
            found = await self._lookup(keys=[data_key, lock_key], args=argv)
            if found[0]:
                return {"version": found[1].decode(), "rows": orjson.loads(found[2])}, "hit"
            locked = bool(found[1])
        except aioredis.RedisError as exc:
            log.warning("cache unavailable, serving without it", extra={"model": model, "error": str(exc)})
            return await compute(), "error"
        if not locked:
            # Another request (this replica or another) is computing this answer: wait for its stored
            # result, and stop waiting once it lets go of the lock without storing one (it failed or
            # fell back: neither is shared).
            waited = 0.0
            while waited < self.lock_ms / 1000:
                await asyncio.sleep(self.poll_s)
                waited += self.poll_s
                try:
                    found = await self._lookup(keys=[data_key, lock_key], args=["", self.lock_ms])
                except aioredis.RedisError:
                    break
                if found[0]:
                    return {"version": found[1].decode(), "rows": orjson.loads(found[2])}, "coalesced"
                if not found[1]:
                    break
            return await compute(), "miss"
        try:
            value = await compute()
            if isinstance(value, dict) and value.get("fallback"):
                return value, "miss"  # a degraded answer must not outlive the failure
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.unlink(data_key)  # an entry of the old layout (a string) gives way
                    pipe.hset(data_key, mapping={"version": value["version"], "rows": orjson.dumps(
                        value["rows"], option=orjson.OPT_SERIALIZE_NUMPY)})
                    await pipe.expire(data_key, ttl_s).execute()
            except aioredis.RedisError as exc:
                log.warning("cache write failed", extra={"model": model, "error": str(exc)})
            return value, "miss"
        finally:
            try:
                await self.redis.eval(_RELEASE, 1, lock_key, token)
            except aioredis.RedisError:
                pass

    async def flush(self, model: str) -> int:
        """Delete every cached response of a model (SCAN, never KEYS, so Redis stays responsive)."""
        deleted = 0
        async for batch in _batched(self.redis.scan_iter(match=f"{PREFIX}:{model}:*", count=1000), 500):
            deleted += await self.redis.unlink(*batch)
        return deleted

    async def stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for metric in CACHE.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    m, r = sample.labels["model"], sample.labels["result"]
                    out.setdefault(m, {})[r] = sample.value
        for counts in out.values():
            looked = sum(v for k, v in counts.items() if k != "bypass")
            counts["hit_ratio"] = (counts.get("hit", 0) + counts.get("coalesced", 0)) / looked if looked else 0.0
        return out


async def _batched(aiter, n):
    batch = []
    async for item in aiter:
        batch.append(item)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch
