"""Token buckets in Redis, updated atomically by one Lua script: global across gateway replicas.

Each principal has a bucket of `limit` tokens per `window_s` (capacity = limit, refill = limit/window).
A request takes 1 from its requests bucket; an embeddings request also takes its approximate input
token count from its tokens bucket. Both are checked and taken in one script call, so a request
either passes every bucket or takes nothing. The clock is Redis's (TIME), not each replica's.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
from dataclasses import dataclass

from prometheus_client import Counter

log = logging.getLogger("aistack.gateway.ratelimit")

REJECTED = Counter("aistack_gateway_ratelimit_rejected_total", "Requests answered 429", ["bucket"])
REDIS_ERRORS = Counter("aistack_gateway_ratelimit_redis_errors_total",
                       "Rate-limit checks that could not reach Redis", ["mode"])

# KEYS: bucket keys. ARGV: per bucket (capacity, refill per second, cost).
# Returns {allowed, retry_after_s, remaining_1, reset_s_1, remaining_2, reset_s_2, ...} (as strings).
TOKEN_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local state = {}
local allowed = 1
local retry = 0
for i = 1, n do
  local cap = tonumber(ARGV[3*i-2]); local rate = tonumber(ARGV[3*i-1]); local cost = tonumber(ARGV[3*i])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(b[1]); local ts = tonumber(b[2])
  if tokens == nil or ts == nil then tokens = cap; ts = now end
  if now > ts then tokens = math.min(cap, tokens + (now - ts) * rate) end
  state[i] = tokens
  if tokens < cost then
    allowed = 0
    local wait = (cost - tokens) / rate
    if wait > retry then retry = wait end
  end
end
local out = {allowed, tostring(retry)}
for i = 1, n do
  local cap = tonumber(ARGV[3*i-2]); local rate = tonumber(ARGV[3*i-1]); local cost = tonumber(ARGV[3*i])
  local tokens = state[i]
  if allowed == 1 then tokens = tokens - cost end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate * 1000) + 1000)
  out[#out+1] = tostring(tokens)
  out[#out+1] = tostring((cap - tokens) / rate)
end
return out
"""


@dataclass(frozen=True)
class Bucket:
    name: str  # "requests" | "tokens"
    limit: int  # per window
    cost: int
    window_s: int = 60


@dataclass
class Decision:
    allowed: bool
    retry_after_s: float
    buckets: list[tuple[Bucket, float, float]]  # (bucket, remaining, reset_s)

    def headers(self) -> dict[str, str]:
        """IETF RateLimit header fields for the tightest bucket, plus Retry-After when refused."""
        if not self.buckets:
            return {}
        bucket, remaining, reset = min(self.buckets, key=lambda b: b[1] / b[0].limit)
        policy = ", ".join(f'{b.limit};w={b.window_s};comment="{b.name}"' for b, _, _ in self.buckets)
        headers = {"RateLimit-Limit": str(bucket.limit), "RateLimit-Remaining": str(max(0, math.floor(remaining))),
                   "RateLimit-Reset": str(max(0, math.ceil(reset))), "RateLimit-Policy": policy}
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


class RateLimiter:
    """Bucket keys name the principal by a keyed hash (HMAC-SHA256 with `secret`, the internal
    token), never by its id: Redis holds no subject identifier (docs/privacy.md)."""

    def __init__(self, redis, fail_open: bool = True, prefix: str = "gateway:rl:", secret: str | None = None):
        self.redis, self.fail_open, self.prefix = redis, fail_open, prefix
        self.secret = (secret or "aistack-rate-limit").encode()
        self.script = redis.register_script(TOKEN_BUCKET_LUA)

    async def take(self, principal_key: str, buckets: list[Bucket]) -> Decision | None:
        """A Decision, or None when Redis failed and the limiter fails open."""
        # One hash tag per principal: every bucket of a principal lands in the same cluster slot.
        tag = hmac.new(self.secret, principal_key.encode(), hashlib.sha256).hexdigest()[:32]
        keys = [f"{self.prefix}{{{tag}}}:{b.name}" for b in buckets]
        args: list = []
        for b in buckets:
            args += [b.limit, b.limit / b.window_s, b.cost]
        try:
            out = await self.script(keys=keys, args=args)
        except Exception as exc:
            REDIS_ERRORS.labels("open" if self.fail_open else "closed").inc()
            log.warning("rate limiter unavailable (%s): %s", "fail-open" if self.fail_open else "fail-closed", exc)
            if self.fail_open:
                return None
            raise
        values = [v.decode() if isinstance(v, bytes) else v for v in out]
        allowed, retry = int(values[0]) == 1, float(values[1])
        state = [(b, float(values[2 + 2 * i]), float(values[3 + 2 * i])) for i, b in enumerate(buckets)]
        decision = Decision(allowed, retry, state)
        if not allowed:
            tight = min(state, key=lambda s: s[1] - s[0].cost)
            REJECTED.labels(tight[0].name).inc()
        return decision


def approx_tokens(body: bytes) -> int:
    """Input tokens of an embeddings request, approximated as characters / 4 (OpenAI's rule of thumb)."""
    import json

    try:
        doc = json.loads(body)
    except ValueError:
        return max(1, len(body) // 4)
    text = doc.get("input", doc.get("inputs", "")) if isinstance(doc, dict) else doc

    def chars(v) -> int:
        if isinstance(v, str):
            return len(v)
        if isinstance(v, list):
            return sum(chars(x) for x in v)
        if isinstance(v, dict):
            return sum(chars(x) for x in v.values())
        return len(str(v)) if v is not None else 0

    return max(1, math.ceil(chars(text) / 4))
