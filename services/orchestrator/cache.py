"""Response cache in Redis with request coalescing.

The key is sha256 of canonical JSON of (model, resolved version, inputs): identical across
processes and restarts. Concurrent identical misses share one inference: a future per key in
this process, and a short Redis lock so that other replicas wait for the first one's result.
Redis trouble never fails a prediction: the cache steps aside.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from typing import Any, Awaitable, Callable

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter

log = logging.getLogger("aistack.orchestrator.cache")

CACHE = Counter("aistack_orchestrator_cache_requests_total", "Response cache lookups by result",
                ["model", "result"])
PREFIX = "orchestrator:cache"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def cache_key(model: str, version: str, rows: list[dict]) -> str:
    canonical = orjson.dumps({"model": model, "version": version, "inputs": rows},
                             option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    return hashlib.sha256(canonical).hexdigest()


class ResponseCache:
    def __init__(self, redis: aioredis.Redis, lock_ms: int = 5000, poll_s: float = 0.01):
        self.redis = redis
        self.lock_ms, self.poll_s = lock_ms, poll_s
        self._inflight: dict[str, asyncio.Future] = {}

    async def get_or_compute(self, model: str, key: str, ttl_s: int, compute: Callable[[], Awaitable[Any]],
                             bypass: bool = False) -> tuple[Any, str]:
        """Return (value, result) where result is hit, miss, coalesced, bypass or error."""
        if bypass or ttl_s <= 0:
            CACHE.labels(model, "bypass").inc()
            return await compute(), "bypass"
        if key in self._inflight:
            CACHE.labels(model, "coalesced").inc()
            return await asyncio.shield(self._inflight[key]), "coalesced"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value, result = await self._lookup_or_compute(model, key, ttl_s, compute)
            future.set_result(value)
            CACHE.labels(model, result).inc()
            return value, result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[key]

    async def _lookup_or_compute(self, model, key, ttl_s, compute) -> tuple[Any, str]:
        data_key, lock_key = f"{PREFIX}:{model}:{key}", f"{PREFIX}:lock:{key}"
        try:
            cached = await self.redis.get(data_key)
            if cached is not None:
                return orjson.loads(cached), "hit"
            token = secrets.token_hex(8)
            locked = await self.redis.set(lock_key, token, nx=True, px=self.lock_ms)
        except aioredis.RedisError as exc:
            log.warning("cache unavailable, serving without it", extra={"model": model, "error": str(exc)})
            return await compute(), "error"
        if not locked:
            # Another replica is computing this exact request: wait for its result.
            waited = 0.0
            while waited < self.lock_ms / 1000:
                await asyncio.sleep(self.poll_s)
                waited += self.poll_s
                try:
                    cached = await self.redis.get(data_key)
                except aioredis.RedisError:
                    break
                if cached is not None:
                    return orjson.loads(cached), "coalesced"
            return await compute(), "miss"
        try:
            value = await compute()
            if isinstance(value, dict) and value.get("fallback"):
                return value, "miss"  # a degraded answer must not outlive the failure
            try:
                await self.redis.set(data_key, orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY), ex=ttl_s)
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
