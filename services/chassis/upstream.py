"""Replica pools for any upstream: power of two random choices on outstanding requests, passive
ejection after consecutive failures with re-admission, retries on another replica."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import httpx
from prometheus_client import Counter, Gauge

from .clients import peer_closed_before_response
from .errors import AppError

log = logging.getLogger("aistack.upstream")


class UpstreamError(AppError):
    """The upstream failed (not the caller's request): callers may fall back or retry elsewhere."""


EJECTIONS = Counter("aistack_upstream_ejections_total", "Replicas ejected after failures", ["upstream"])
RETRIES = Counter("aistack_upstream_retries_total", "Requests retried on another replica", ["upstream"])
FAILURES = Counter("aistack_upstream_failures_total", "Failed upstream attempts", ["upstream", "kind"])
OUTSTANDING = Gauge("aistack_upstream_outstanding", "Requests in flight", ["upstream"])

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
                      params: str = "", timeout_s: float | None = None,
                      idempotent: bool | None = None) -> httpx.Response:
        """Send to one replica. A request that never reached its replica is retried on another; an
        idempotent one is also retried after a timeout, a broken connection or a 502/503/504."""
        sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        # A streamed body can be sent once only: no second attempt.
        replayable = isinstance(content, (bytes, bytearray))
        attempts = 1 + min(self.retries, len(self.pool.replicas) - 1) if replayable else 1
        # POST is not idempotent in general; a caller that knows better (inference) says so.
        idempotent = method.upper() in IDEMPOTENT if idempotent is None else idempotent
        # A caller's deadline (timeout_s) covers every attempt, like Envoy's route timeout. When the
        # deadline, not the pool's own timeout, cuts an attempt short, that is the caller's budget
        # running out, not the replica failing: it never counts towards ejection.
        own = httpx.Timeout(self.timeout_s) if self.timeout_s else self.http.timeout
        deadline = time.monotonic() + timeout_s if timeout_s else None
        tried: tuple[Replica, ...] = ()
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            allowed = None if deadline is None else deadline - time.monotonic()
            if allowed is not None and allowed <= 0:
                raise deadline_exceeded(self.pool.name, timeout_s)
            replica = self.pool.pick(tried)
            tried += (replica,)
            if attempt:
                RETRIES.labels(self.pool.name).inc()
            replica.outstanding += 1
            OUTSTANDING.labels(self.pool.name).inc()
            try:
                url = f"{replica.url}{path}" + (f"?{params}" if params else "")
                kwargs = {"timeout": _attempt_timeout(own, allowed)} if allowed or self.timeout_s else {}
                response = await self.http.request(method, url, content=content, headers=sent, **kwargs)
            except httpx.TimeoutException as exc:
                if _cut_by_deadline(exc, allowed, own):
                    FAILURES.labels(self.pool.name, "deadline").inc()
                    raise deadline_exceeded(self.pool.name, timeout_s) from None
                if isinstance(exc, httpx.PoolTimeout):  # our own connection pool is full: not the replica
                    FAILURES.labels(self.pool.name, "pool").inc()
                    raise UpstreamError(503, "upstream_busy", f"no free connection to {self.pool.name}",
                                        headers={"Retry-After": "1"}) from None
                connect = isinstance(exc, httpx.ConnectTimeout)
                FAILURES.labels(self.pool.name, "connect" if connect else "timeout").inc()
                self.pool.record(replica, ok=False)
                if (connect or idempotent) and not last:
                    continue
                if connect:
                    raise UpstreamError(503, "upstream_unavailable", f"{self.pool.name} did not accept a "
                                        f"connection within {own.connect:g} s", headers={"Retry-After": "2"}) from None
                waited = allowed if allowed is not None else _phase_limit(exc, own)
                raise UpstreamError(504, "upstream_timeout", f"{self.pool.name} did not answer within "
                                    f"{waited:g} s") from None
            except NOT_SENT:
                FAILURES.labels(self.pool.name, "connect").inc()
                self.pool.record(replica, ok=False)
                if not last:
                    continue
                raise UpstreamError(503, "upstream_unavailable", f"{self.pool.name} is unreachable",
                               headers={"Retry-After": "2"}) from None
            except httpx.TransportError as exc:
                FAILURES.labels(self.pool.name, "transport").inc()
                self.pool.record(replica, ok=False)
                # Closed before any response byte (after the client's own retry on a fresh
                # connection, clients.StaleConnectionRetry): never processed, so any method may
                # go to another replica.
                if (idempotent or peer_closed_before_response(exc)) and not last:
                    continue
                log.warning("%s broke the connection: %s %s", self.pool.name, type(exc).__name__, exc)
                raise UpstreamError(502, "bad_gateway", f"{self.pool.name} broke the connection") from None
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


def deadline_exceeded(name: str, deadline_s: float) -> UpstreamError:
    """504 naming the caller's deadline (the replica may be perfectly healthy)."""
    return UpstreamError(504, "deadline_exceeded", f"{name} did not answer within the caller's deadline of "
                         f"{deadline_s:g} s", {"deadline_s": deadline_s})


def _phase_limit(exc: httpx.TimeoutException, timeout: httpx.Timeout) -> float:
    phase = ("connect" if isinstance(exc, httpx.ConnectTimeout) else "write" if isinstance(exc, httpx.WriteTimeout)
             else "pool" if isinstance(exc, httpx.PoolTimeout) else "read")
    return getattr(timeout, phase) or 0.0


def _attempt_timeout(own: httpx.Timeout, allowed: float | None) -> httpx.Timeout:
    """The pool's own timeouts, each shortened to what is left of the caller's deadline (if any)."""
    if allowed is None:
        return own
    return httpx.Timeout(connect=min(allowed, own.connect or allowed), read=allowed, write=allowed,
                         pool=min(allowed, own.pool or allowed))


def _cut_by_deadline(exc: httpx.TimeoutException, allowed: float | None, own: httpx.Timeout) -> bool:
    """Whether the timeout that fired was the caller's deadline cutting the attempt short rather than
    the replica missing the pool's own limit for that phase (only that is the replica's failure)."""
    if allowed is None:
        return False
    limit = _phase_limit(exc, own)
    return not limit or allowed < limit
