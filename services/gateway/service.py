"""Load balancing over upstream replicas: least outstanding requests, passive health ejection."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import httpx

from services.chassis.errors import AppError


@dataclass
class Replica:
    url: str
    outstanding: int = 0
    failures: int = 0
    ejected_until: float = 0.0


class UpstreamPool:
    """Pick the replica with the fewest requests in flight; sit out one that keeps failing."""

    def __init__(self, name: str, urls: list[str], eject_after: int = 3, eject_s: float = 10.0):
        if not urls:
            raise ValueError(f"upstream {name} has no replicas")
        self.name = name
        self.replicas = [Replica(u) for u in urls]
        self.eject_after, self.eject_s = eject_after, eject_s

    def pick(self) -> Replica:
        now = time.monotonic()
        live = [r for r in self.replicas if r.ejected_until <= now] or self.replicas
        least = min(r.outstanding for r in live)
        return random.choice([r for r in live if r.outstanding == least])

    def healthy(self) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self.replicas if r.ejected_until <= now]

    def record(self, replica: Replica, ok: bool) -> None:
        if ok:
            replica.failures = 0
            return
        replica.failures += 1
        if replica.failures >= self.eject_after:
            replica.ejected_until = time.monotonic() + self.eject_s
            replica.failures = 0


# Hop-by-hop headers are for one connection only (RFC 9110 7.6.1); never forward them.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


class Proxy:
    def __init__(self, http: httpx.AsyncClient, pool: UpstreamPool):
        self.http, self.pool = http, pool

    async def forward(self, method: str, path: str, content: bytes, headers: dict[str, str],
                      params: str = "") -> httpx.Response:
        """Send to one replica; a connection failure on one is retried once on another."""
        sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        attempts = min(2, len(self.pool.replicas))
        for attempt in range(attempts):
            replica = self.pool.pick()
            replica.outstanding += 1
            try:
                url = f"{replica.url}{path}" + (f"?{params}" if params else "")
                response = await self.http.request(method, url, content=content, headers=sent)
            except httpx.TimeoutException:
                self.pool.record(replica, ok=False)
                raise AppError(504, "upstream_timeout", f"{self.pool.name} timed out") from None
            except httpx.TransportError:
                self.pool.record(replica, ok=False)
                if attempt + 1 < attempts:
                    continue
                raise AppError(503, "upstream_unavailable", f"{self.pool.name} is unreachable",
                               headers={"Retry-After": "2"}) from None
            finally:
                replica.outstanding -= 1
            self.pool.record(replica, ok=response.status_code < 500 or response.status_code == 503)
            return response
        raise AssertionError("unreachable")
