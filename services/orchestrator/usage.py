"""Per-principal usage: requests and rows per principal and model, per UTC day, in Redis.

Why not Prometheus: a `principal` label adds a time series per user or key forever (docs/metrics.md).
Here a day is one hash (`orchestrator:usage:<YYYY-MM-DD>`, fields `<kind>:<model>:<principal>`,
kept USAGE_DAYS days); the admin overview reads the top principals from GET /admin/usage, and
erasure deletes a principal's fields.
"""
from __future__ import annotations

import time

import redis.asyncio as aioredis

PREFIX = "orchestrator:usage"
USAGE_DAYS = 35
KINDS = ("requests", "rows", "cached_rows")


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class Usage:
    def __init__(self, redis: aioredis.Redis, keep_days: int = USAGE_DAYS):
        self.redis, self.keep_days = redis, keep_days

    def _keys(self, days: int) -> list[str]:
        now = time.time()
        return [f"{PREFIX}:{_day(now - d * 86400)}" for d in range(days)]

    def commands(self, principal: str, model: str, rows: int, cached: bool) -> list[tuple]:
        """The Redis commands counting one prediction, for the prediction log's own round trip
        (its pipeline, or the cache lookup's script on a hit)."""
        key = f"{PREFIX}:{_day(time.time())}"
        out = [("HINCRBY", key, f"requests:{model}:{principal}", 1), ("HINCRBY", key, f"rows:{model}:{principal}", rows)]
        if cached:
            out.append(("HINCRBY", key, f"cached_rows:{model}:{principal}", rows))
        out.append(("EXPIRE", key, self.keep_days * 86400))
        return out

    async def _fields(self, days: int):
        for key in self._keys(min(days, self.keep_days)):
            async for field, value in self.redis.hscan_iter(key, count=1000):
                kind, model, principal = field.decode().split(":", 2)
                yield key, field, kind, model, principal, int(value)

    async def top(self, days: int = 7, limit: int = 50) -> list[dict]:
        """The principals with the most rows over the last `days` days, with their per-model rows."""
        totals: dict[str, dict] = {}
        async for _, _, kind, model, principal, value in self._fields(days):
            t = totals.setdefault(principal, {"principal": principal, **{k: 0 for k in KINDS}, "models": {}})
            t[kind] += value
            if kind == "rows":
                t["models"][model] = t["models"].get(model, 0) + value
        return sorted(totals.values(), key=lambda t: (-t["rows"], t["principal"]))[:limit]

    async def of(self, principal: str) -> list[dict]:
        """One principal's counts per day and model (for the data-subject export)."""
        out: dict[tuple[str, str], dict] = {}
        async for key, _, kind, model, who, value in self._fields(self.keep_days):
            if who == principal:
                day = key.rsplit(":", 1)[1]
                out.setdefault((day, model), {"day": day, "model": model, **{k: 0 for k in KINDS}})[kind] = value
        return sorted(out.values(), key=lambda r: (r["day"], r["model"]))

    async def erase(self, principal: str) -> int:
        """Delete every field of this principal (exact match: `apikey:x` is not `x`). Idempotent."""
        doomed: dict[str, list[bytes]] = {}
        async for key, field, _, _, who, _ in self._fields(self.keep_days):
            if who == principal:
                doomed.setdefault(key, []).append(field)
        deleted = 0
        for key, fields in doomed.items():
            deleted += await self.redis.hdel(key, *fields)
        return deleted
