"""Load balancing over upstream replicas: power of two random choices on outstanding requests,
passive ejection after consecutive failures with re-admission, retries on another replica."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import httpx
from prometheus_client import Counter, Gauge

from services.chassis.errors import AppError

log = logging.getLogger("aistack.gateway")

EJECTIONS = Counter("aistack_gateway_upstream_ejections_total", "Replicas ejected after failures", ["upstream"])
RETRIES = Counter("aistack_gateway_upstream_retries_total", "Requests retried on another replica", ["upstream"])
FAILURES = Counter("aistack_gateway_upstream_failures_total", "Failed upstream attempts", ["upstream", "kind"])
OUTSTANDING = Gauge("aistack_gateway_upstream_outstanding", "Requests in flight", ["upstream"])

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Errors where the request never reached the replica: safe to retry whatever the method.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass
class Replica:
    url: str
    outstanding: int = 0
    failures: int = 0
    ejected_until: float = 0.0


class UpstreamPool:
    """Pick the less busy of two random live replicas; sit out one that keeps failing."""

    def __init__(self, name: str, urls: list[str], eject_after: int = 3, eject_s: float = 10.0):
        if not urls:
            raise ValueError(f"upstream {name} has no replicas")
        self.name = name
        self.replicas = [Replica(u) for u in urls]
        self.eject_after, self.eject_s = eject_after, eject_s

    def healthy(self) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self.replicas if r.ejected_until <= now]

    def pick(self, exclude: tuple[Replica, ...] = ()) -> Replica:
        candidates = [r for r in self.healthy() if r not in exclude]
        if not candidates:
            # Every replica ejected (or tried): better to try one than to fail without trying.
            candidates = [r for r in self.replicas if r not in exclude] or self.replicas
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        return a if a.outstanding <= b.outstanding else b

    def record(self, replica: Replica, ok: bool) -> None:
        if ok:
            replica.failures = 0
            return
        replica.failures += 1
        if replica.failures >= self.eject_after and replica.ejected_until <= time.monotonic():
            replica.ejected_until = time.monotonic() + self.eject_s
            replica.failures = 0
            EJECTIONS.labels(self.name).inc()
            log.warning("ejected %s replica %s for %.0fs", self.name, replica.url, self.eject_s)


# Hop-by-hop headers are for one connection only (RFC 9110 7.6.1); never forward them.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


class Proxy:
    def __init__(self, http: httpx.AsyncClient, pool: UpstreamPool, retries: int = 1,
                 timeout_s: float | None = None):
        self.http, self.pool, self.retries, self.timeout_s = http, pool, retries, timeout_s

    async def forward(self, method: str, path: str, content: bytes, headers: dict[str, str],
                      params: str = "", timeout_s: float | None = None) -> httpx.Response:
        """Send to one replica. A request that never reached its replica is retried on another; an
        idempotent one is also retried after a timeout, a broken connection or a 502/503/504."""
        sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        attempts = 1 + min(self.retries, len(self.pool.replicas) - 1)
        idempotent = method.upper() in IDEMPOTENT
        timeout = timeout_s or self.timeout_s
        tried: tuple[Replica, ...] = ()
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            replica = self.pool.pick(tried)
            tried += (replica,)
            if attempt:
                RETRIES.labels(self.pool.name).inc()
            replica.outstanding += 1
            OUTSTANDING.labels(self.pool.name).inc()
            try:
                url = f"{replica.url}{path}" + (f"?{params}" if params else "")
                kwargs = {"timeout": timeout} if timeout else {}
                response = await self.http.request(method, url, content=content, headers=sent, **kwargs)
            except NOT_SENT:
                FAILURES.labels(self.pool.name, "connect").inc()
                self.pool.record(replica, ok=False)
                if not last:
                    continue
                raise AppError(503, "upstream_unavailable", f"{self.pool.name} is unreachable",
                               headers={"Retry-After": "2"}) from None
            except httpx.TimeoutException:
                FAILURES.labels(self.pool.name, "timeout").inc()
                self.pool.record(replica, ok=False)
                if idempotent and not last:
                    continue
                raise AppError(504, "upstream_timeout", f"{self.pool.name} timed out") from None
            except httpx.TransportError:
                FAILURES.labels(self.pool.name, "transport").inc()
                self.pool.record(replica, ok=False)
                if idempotent and not last:
                    continue
                raise AppError(502, "bad_gateway", f"{self.pool.name} broke the connection") from None
            finally:
                replica.outstanding -= 1
                OUTSTANDING.labels(self.pool.name).dec()
            failed = response.status_code in (500, 502, 504)
            self.pool.record(replica, ok=not failed)
            if failed or response.status_code == 503:
                FAILURES.labels(self.pool.name, str(response.status_code)).inc()
                if idempotent and not last and response.status_code in (502, 503, 504):
                    continue
            return response
        raise AssertionError("unreachable")


# -- the request path -------------------------------------------------------------------------
from .ratelimit import Bucket, RateLimiter, approx_tokens
from .routes import Route
from .security import Authenticator, Principal

# Headers a client may not set: the gateway alone says who the principal is.
PRINCIPAL_HEADERS = ("x-principal", "x-principal-scopes", "x-principal-role", "x-principal-kind")
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "cookie")
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "date", "server"}


@dataclass
class Upstreamed:
    status: int
    headers: dict[str, str]
    content: bytes


class Gateway:
    """Authenticate, authorize, limit, proxy: the whole request path, without the web framework."""

    def __init__(self, settings, proxies: dict[str, Proxy], authenticator: Authenticator,
                 limiter: RateLimiter | None):
        self.s, self.proxies, self.authn, self.limiter = settings, proxies, authenticator, limiter

    async def principal(self, route: Route, headers, client_ip: str) -> Principal:
        if route.scope is None:
            return Principal(client_ip or "unknown", "anonymous", "anonymous", frozenset())
        principal = await self.authn.authenticate(headers)
        if route.scope and route.scope not in principal.scopes:
            raise AppError(403, "insufficient_scope", f"this route needs scope {route.scope!r}",
                           {"required": route.scope, "granted": sorted(principal.scopes)},
                           headers={"WWW-Authenticate": f'Bearer realm="aistack", error="insufficient_scope", '
                                                        f'scope="{route.scope}"'})
        return principal

    def buckets(self, route: Route, principal: Principal, body: bytes) -> list[Bucket]:
        if principal.kind == "anonymous":
            rpm = self.s.rate_limit_anonymous_rpm
        else:
            rpm = principal.rate_limit_rpm or self.s.rate_limit_rpm.get(principal.role, self.s.rate_limit_default_rpm)
        buckets = [Bucket("requests", rpm, 1)]
        if route.count_tokens:
            tpm = self.s.rate_limit_tpm.get(principal.role, self.s.rate_limit_default_tpm)
            cost = approx_tokens(body)
            if cost > tpm:
                raise AppError(413, "too_many_input_tokens",
                               f"about {cost} input tokens; the limit is {tpm} per minute",
                               {"tokens": cost, "limit_per_minute": tpm})
            buckets.append(Bucket("tokens", tpm, cost))
        return buckets

    async def limit(self, route: Route, principal: Principal, body: bytes) -> dict[str, str]:
        if self.limiter is None or not self.s.rate_limit_enabled:
            return {}
        buckets = self.buckets(route, principal, body)
        try:
            decision = await self.limiter.take(principal.rate_key, buckets)
        except Exception:  # noqa: BLE001
            raise AppError(503, "rate_limiter_unavailable", "rate limiting is unavailable; try again",
                           headers={"Retry-After": "5"}) from None
        if decision is None:
            return {}
        headers = decision.headers()
        if not decision.allowed:
            raise AppError(429, "rate_limited", "rate limit exceeded; slow down",
                           {"retry_after_s": int(headers["Retry-After"])}, headers=headers)
        return headers

    def upstream_headers(self, route: Route, headers, principal: Principal, client_ip: str) -> dict[str, str]:
        drop = set(PRINCIPAL_HEADERS) | {"x-forwarded-for"}
        if not route.forward_credentials:
            drop |= set(CREDENTIAL_HEADERS)
        out = {k: v for k, v in headers.items() if k.lower() not in drop and k.lower() not in HOP_BY_HOP}
        if principal.kind != "anonymous":
            out.update({"X-Principal": principal.sub, "X-Principal-Scopes": " ".join(sorted(principal.scopes)),
                        "X-Principal-Role": principal.role, "X-Principal-Kind": principal.kind})
        if client_ip:
            out["X-Forwarded-For"] = client_ip
        return out

    async def handle(self, route: Route, method: str, path: str, query: str, headers, read_body,
                     client_ip: str) -> Upstreamed:
        start = time.perf_counter()
        principal = await self.principal(route, headers, client_ip)
        auth_ms = (time.perf_counter() - start) * 1000
        body = await read_body(self.s.max_body_bytes)
        limit_headers = await self.limit(route, principal, body)
        sent = self.upstream_headers(route, headers, principal, client_ip)
        before = time.perf_counter()
        upstream = await self.proxies[route.upstream].forward(method, path, body, sent, query)
        upstream_ms = (time.perf_counter() - before) * 1000
        out = {k: v for k, v in upstream.headers.items()
               if k.lower() not in RESPONSE_DROP and k.lower() != "server-timing"}
        out.update(limit_headers)
        gateway_ms = (time.perf_counter() - start) * 1000 - upstream_ms
        timing = f"gateway;dur={gateway_ms:.1f}, auth;dur={auth_ms:.1f}"
        out["Server-Timing"] = ", ".join(filter(None, [timing, upstream.headers.get("server-timing")]))
        return Upstreamed(upstream.status_code, out, upstream.content)
