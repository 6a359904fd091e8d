"""The gateway's request path: authenticate, check scopes, rate-limit, forward to a replica."""
from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from services.chassis.errors import AppError
from services.chassis.upstream import HOP_BY_HOP, Proxy

from .ratelimit import Bucket, RateLimiter, approx_tokens
from .routes import Route
from .security import Authenticator, Principal

# Headers a client may not set: the gateway alone says who the principal is.
PRINCIPAL_HEADERS = ("x-principal", "x-principal-scopes", "x-principal-role", "x-principal-kind",
                     "x-principal-owner")
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "cookie")
RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "date", "server"}


def public_location(value: str) -> str:
    """An upstream's redirect names its own (internal) address: keep only the path and query, which
    the client resolves against the gateway (RFC 9110 allows a relative Location)."""
    parts = urlsplit(value)
    if not parts.scheme and not parts.netloc:
        return value
    return urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment))


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
        principal = await self.authn.authenticate(headers, client_ip)
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
                        "X-Principal-Role": principal.role, "X-Principal-Kind": principal.kind,
                        # The subject a key's data belongs to (docs/privacy.md): the user for a user.
                        "X-Principal-Owner": principal.owner or principal.sub})
        if client_ip:
            out["X-Forwarded-For"] = client_ip
        return out

    async def handle(self, route: Route, method: str, path: str, query: str, headers, read_body,
                     client_ip: str) -> Upstreamed:
        start = time.perf_counter()
        principal = await self.principal(route, headers, client_ip)
        auth_ms = (time.perf_counter() - start) * 1000
        if route.stream_body:
            body = await read_body(self.s.max_upload_bytes, stream=True)
        else:
            body = await read_body(self.s.max_body_bytes)
        limit_headers = await self.limit(route, principal, body if isinstance(body, bytes) else b"")
        sent = self.upstream_headers(route, headers, principal, client_ip)
        before = time.perf_counter()
        upstream = await self.proxies[route.upstream].forward(method, path, body, sent, query)
        upstream_ms = (time.perf_counter() - before) * 1000
        out = {k: v for k, v in upstream.headers.items()
               if k.lower() not in RESPONSE_DROP and k.lower() != "server-timing"}
        if "location" in {k.lower() for k in out}:
            out = {k: (public_location(v) if k.lower() == "location" else v) for k, v in out.items()}
        out.update(limit_headers)
        gateway_ms = (time.perf_counter() - start) * 1000 - upstream_ms
        timing = f"gateway;dur={gateway_ms:.1f}, auth;dur={auth_ms:.1f}"
        out["Server-Timing"] = ", ".join(filter(None, [timing, upstream.headers.get("server-timing")]))
        return Upstreamed(upstream.status_code, out, upstream.content)
