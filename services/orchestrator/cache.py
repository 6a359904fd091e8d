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

    async def get_or_compute(self, model: str, key: str, ttl_s: int, compute: Callable[[], Awaitable[Any]],
                             bypass: bool = False, flight: str | None = None) -> tuple[Any, str]:
        """Return (value, result) where result is hit, miss, coalesced, bypass or error. `flight`
        (default: the key) groups concurrent callers that may share one computation; a value with
        `"fallback": True` is returned to them but never stored."""
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
            value, result = await self._lookup_or_compute(model, key, ttl_s, compute)
            future.set_result(value)
            CACHE.labels(model, result).inc()
            return value, result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[flight]

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
            # Another request (this replica or another) is computing this answer: wait for its stored
            # result, and stop waiting once it lets go of the lock without storing one (it failed or
            # fell back: neither is shared).
            waited = 0.0
            while waited < self.lock_ms / 1000:
                await asyncio.sleep(self.poll_s)
                waited += self.poll_s
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        cached, held = await pipe.get(data_key).exists(lock_key).execute()
                except aioredis.RedisError:
                    break
                if cached is not None:
                    return orjson.loads(cached), "coalesced"
                if not held:
                    break
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
