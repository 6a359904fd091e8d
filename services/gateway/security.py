"""Who is calling: access tokens verified locally against auth's JWKS (cached, no call to auth per
request), API keys through auth's introspection cached in Redis for a short TTL; both checked against
auth's revocations held in memory (revocation.py), and failed attempts limited per client address
before any lookup (FailedAuthLimiter)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from jose import jwk, jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError
from prometheus_client import Counter

from services.chassis.errors import AppError

log = logging.getLogger("aistack.gateway.security")

AUTH_RESULTS = Counter("aistack_gateway_auth_total", "Authentication outcomes", ["method", "result"])
JWKS_FETCHES = Counter("aistack_gateway_jwks_fetches_total", "JWKS fetches from auth", ["result"])
APIKEY_CACHE = Counter("aistack_gateway_apikey_cache_total", "API key introspection cache", ["result"])

API_KEY_PREFIX = "ak_"
# Only asymmetric algorithms: "none" and HS* (the key-confusion attack) never verify.
SUPPORTED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256"})
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC"}


@dataclass(frozen=True)
class Principal:
    sub: str
    kind: str  # "user" | "api_key" | "anonymous"
    role: str
    scopes: frozenset[str]
    rate_limit_rpm: int | None = None
    owner: str | None = None  # the user an API key belongs to (the user itself for a user)

    @property
    def rate_key(self) -> str:
        return f"{self.kind}:{self.sub}"


_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def header_safe(text: str, limit: int = 200) -> str:
    """A value fit for a quoted-string in a header: printable ASCII, no quote or backslash (RFC 6750
    allows only %x20-21 / %x23-5B / %x5D-7E in error_description); anything else becomes '?'."""
    return _UNSAFE.sub("?", text)[:limit]


def unauthorized(message: str, error: str | None = "invalid_token") -> AppError:
    challenge = 'Bearer realm="aistack"' + (
        f', error="{error}", error_description="{header_safe(message)}"' if error else "")
    return AppError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


class JWKSCache:
    """Public keys by kid, refetched when stale or on an unknown kid (at most every min_refetch_s)."""

    def __init__(self, fetch: Callable[[], Awaitable[dict]], cache_s: float = 300.0, min_refetch_s: float = 5.0):
        self.fetch, self.cache_s, self.min_refetch_s = fetch, cache_s, min_refetch_s
        self.keys: dict[str, tuple[str, object]] = {}  # kid -> (alg, jose key)
        self.fetched_at = 0.0
        self.attempted_at = float("-inf")
        self._lock = asyncio.Lock()

    def load(self, document: dict) -> None:
        keys = {}
        for entry in document.get("keys", []):
            kid, alg = entry.get("kid"), entry.get("alg")
            if not kid or alg not in SUPPORTED_ALGORITHMS or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") != _KTY[alg[:2]]:
                continue
            try:
                keys[kid] = (alg, jwk.construct(entry, alg))
            except Exception as exc:  # a bad entry must not take the others down  # noqa: BLE001
                log.warning("skipping JWK %s: %s", kid, exc)
        self.keys = keys
        self.fetched_at = time.monotonic()

    async def refresh(self, reason: str, quiet: bool = False) -> None:
        """quiet: a failure is expected (auth still starting) and logged at DEBUG only."""
        started = time.monotonic()
        async with self._lock:
            if self.attempted_at >= started:  # someone refreshed while we waited
                return
            self.attempted_at = time.monotonic()
            try:
                self.load(await self.fetch())
                JWKS_FETCHES.labels("ok").inc()
                log.info("JWKS fetched (%s): %d keys", reason, len(self.keys))
            except Exception as exc:  # keep serving with the keys we have  # noqa: BLE001
                JWKS_FETCHES.labels("error").inc()
                (log.debug if quiet else log.warning)("JWKS fetch failed (%s): %s", reason, exc)

    async def get(self, kid: str) -> tuple[str, object] | None:
        now = time.monotonic()
        if now - self.fetched_at > self.cache_s and now - self.attempted_at >= min(self.min_refetch_s, 1.0):
            await self.refresh("stale")
        elif kid not in self.keys and now - self.attempted_at >= self.min_refetch_s:
            await self.refresh("unknown kid")
        elif kid not in self.keys and self._lock.locked():
            # A refresh is in flight (a burst on a fresh gateway): wait for it, don't answer 401.
            async with self._lock:
                pass
        return self.keys.get(kid)


@dataclass(frozen=True)
class _Verified:
    """A token whose signature and claims passed: what each later request with it still checks."""
    kid: str
    key: tuple  # the JWKS entry (alg, key) it was verified with
    exp: float
    sid: object
    iat: float
    principal: Principal


class TokenVerifier:
    """Verifies access tokens locally. A verified token is remembered (up to `cache_size` tokens,
    until its exp) so that a client sending it again costs a dictionary lookup, not an RSA
    verification and claims parse (issue 18); the revocation check and the signing key's presence
    in the JWKS are still checked on every request, so neither revocation nor key removal waits."""

    def __init__(self, jwks: JWKSCache, issuer: str, audience: str, algorithms: list[str], leeway_s: int = 10,
                 revocations=None, cache_size: int = 10_000):
        self.jwks, self.issuer, self.audience, self.leeway_s = jwks, issuer, audience, leeway_s
        self.revocations = revocations
        self.cache_size = cache_size
        self._verified: dict[str, _Verified] = {}
        self.algorithms = frozenset(algorithms) & SUPPORTED_ALGORITHMS
        self.options = {"leeway": leeway_s, "require_exp": True, "require_iat": True, "require_nbf": True,
                        "require_iss": True, "require_aud": True, "require_sub": True, "require_jti": True}

    def _header(self, token: str) -> tuple[str, str]:
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # noqa: BLE001 - whatever the bytes, a bad header is the caller's 401
            raise unauthorized("malformed token") from None
        if not isinstance(header, dict):
            raise unauthorized("malformed token header")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise unauthorized(f"token algorithm {str(alg)[:40]!r} is not allowed")
        if not kid or not isinstance(kid, str):
            raise unauthorized("token has no kid")
        return alg, kid

    def decode(self, token: str, alg: str, key) -> dict:
        """Verify signature and claims with one known key (sync; what the benchmark counts)."""
        try:
            return jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                              options=self.options)
        except ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except JWTClaimsError as exc:
            raise unauthorized(f"invalid claims: {exc}") from None
        except JWTError:
            raise unauthorized("invalid signature") from None

    async def verify(self, token: str) -> Principal:
        hit = self._verified.get(token)
        if hit is not None:
            if time.time() < hit.exp and await self.jwks.get(hit.kid) is hit.key:
                self.check_revoked(hit.principal.sub, hit.sid, hit.iat)
                return hit.principal
            self._verified.pop(token, None)  # expired, or its key rotated out or refetched
        alg, kid = self._header(token)
        found = await self.jwks.get(kid)
        if found is None:
            raise unauthorized("unknown signing key")
        key_alg, key = found
        if key_alg != alg:
            raise unauthorized("token algorithm does not match its key")
        claims = self.decode(token, alg, key)
        scope, sub, iat = claims.get("scope", ""), str(claims["sub"]), claims.get("iat")
        if not isinstance(scope, str):
            raise unauthorized("invalid scope claim")
        if not isinstance(iat, (int, float)) or isinstance(iat, bool):
            raise unauthorized("invalid iat claim")
        self.check_revoked(sub, claims.get("sid"), iat)
        principal = Principal(sub, "user", str(claims.get("role", "")), frozenset(scope.split()), owner=sub)
        self._remember(token, kid, found, claims, principal)
        return principal

    def _remember(self, token: str, kid: str, key: tuple, claims: dict, principal: Principal) -> None:
        exp = claims.get("exp")
        if self.cache_size <= 0 or not isinstance(exp, (int, float)) or isinstance(exp, bool):
            return
        while len(self._verified) >= self.cache_size:  # bounded: the oldest entry goes first
            self._verified.pop(next(iter(self._verified)))
        self._verified[token] = _Verified(kid, key, float(exp), claims.get("sid"), claims["iat"], principal)

    def check_revoked(self, sub: str, sid, iat: float) -> None:
        """Issued before its user's or its session's not-before (logout, disable, role change...)."""
        if self.revocations is None:
            return
        subjects = (f"user:{sub}", f"sid:{sid}") if isinstance(sid, str) else (f"user:{sub}",)
        if iat < self.revocations.not_before(*subjects):
            raise unauthorized("token revoked")


class ApiKeyVerifier:
    """Introspection answers cached in Redis (gateway:apikey:<sha256>) for ttl_s; misses for neg_ttl_s."""

    def __init__(self, redis, introspect: Callable[[str], Awaitable[dict]], ttl_s: float, neg_ttl_s: float,
                 revocations=None):
        self.redis, self.introspect, self.ttl_s, self.neg_ttl_s = redis, introspect, ttl_s, neg_ttl_s
        self.revocations = revocations

    def _stale(self, info: dict) -> bool:
        """A cached answer older than its key's or its owner's latest revocation must be asked again."""
        if self.revocations is None or not info.get("active"):
            return False
        subjects = [f"apikey:{info.get('key_id')}"] + ([f"user:{info['owner']}"] if info.get("owner") else [])
        answered = info.get("iat")
        return not isinstance(answered, (int, float)) or answered < self.revocations.not_before(*subjects)

    async def verify(self, key: str) -> Principal:
        if not key.startswith(API_KEY_PREFIX) or len(key) > 200:
            raise unauthorized("invalid API key")
        cache_key = "gateway:apikey:" + hashlib.sha256(key.encode()).hexdigest()
        info = None
        try:
            raw = await self.redis.get(cache_key)
            if raw is not None:
                info = json.loads(raw)
                if self._stale(info):
                    APIKEY_CACHE.labels("revoked").inc()
                    info = None
                else:
                    APIKEY_CACHE.labels("hit").inc()
        except Exception as exc:  # noqa: BLE001
            APIKEY_CACHE.labels("error").inc()
            log.warning("API key cache unavailable: %s", exc)
        if info is None:
            APIKEY_CACHE.labels("miss").inc()
            info = await self.introspect(key)
            if self._stale(info):  # revoked while auth answered: only the next answer counts
                info = await self.introspect(key)
            ttl = self.ttl_s if info.get("active") else self.neg_ttl_s
            if info.get("active") and info.get("exp"):
                ttl = max(0.001, min(ttl, info["exp"] - time.time()))
            try:
                await self.redis.set(cache_key, json.dumps(info), px=max(1, int(ttl * 1000)))
            except Exception:  # noqa: BLE001,S110
                pass
        if not info.get("active"):
            raise unauthorized("invalid, expired or revoked API key")
        if not info.get("owner"):  # every key has an owner (issue 13); an older answer without one is refused
            raise unauthorized("API key has no owner")
        return Principal(str(info["sub"]), "api_key", str(info.get("role", "")),
                         frozenset(str(info.get("scope", "")).split()), info.get("rate_limit_rpm"),
                         owner=str(info["owner"]))


def credentials(headers) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


# INCR, starting the window on the first failure (EXPIRE NX needs Redis 7); returns {count, ttl}.
_COUNT_FAILURE = ("local n = redis.call('INCR', KEYS[1]) if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end "
                  "return {n, redis.call('TTL', KEYS[1])}")


class FailedAuthLimiter:
    """Failed authentications per client address, counted in Redis (shared by the replicas) in a
    fixed window; an address over the limit is refused from memory, before any lookup at auth.

    The success path costs nothing: only a failure touches Redis."""

    def __init__(self, redis, limit: int, window_s: int = 60, prefix: str = "gateway:authfail:"):
        self.redis, self.limit, self.window_s, self.prefix = redis, limit, window_s, prefix
        self.blocked: dict[str, float] = {}  # address -> monotonic time the block ends

    def check(self, address: str) -> None:
        until = self.blocked.get(address)
        if until is None:
            return
        left = until - time.monotonic()
        if left <= 0:
            self.blocked.pop(address, None)
            return
        AUTH_RESULTS.labels("any", "throttled").inc()
        raise AppError(429, "too_many_failed_authentications",
                       "too many failed authentications from this address; try again later",
                       {"retry_after_s": int(left) + 1}, headers={"Retry-After": str(int(left) + 1)})

    async def failed(self, address: str) -> None:
        key = self.prefix + hashlib.sha256(address.encode()).hexdigest()[:32]
        try:
            count, ttl = await self.redis.eval(_COUNT_FAILURE, 1, key, self.window_s)
        except Exception as exc:  # noqa: BLE001 - count locally then
            log.warning("failed-auth counter unavailable: %s", exc)
            count, ttl = self.limit, self.window_s
        if count >= self.limit:
            if len(self.blocked) > 100_000:  # bounded memory under a spray of addresses
                self.blocked.clear()
            self.blocked[address] = time.monotonic() + max(1, ttl if ttl and ttl > 0 else self.window_s)


class Authenticator:
    def __init__(self, tokens: TokenVerifier, api_keys: ApiKeyVerifier, failures: FailedAuthLimiter | None = None):
        self.tokens, self.api_keys, self.failures = tokens, api_keys, failures

    async def authenticate(self, headers, client_ip: str = "") -> Principal:
        token = credentials(headers)
        if not token:
            AUTH_RESULTS.labels("none", "missing").inc()
            raise unauthorized("missing credentials: send Authorization: Bearer <token> or X-API-Key",
                               error=None)
        if self.failures is not None and client_ip:
            self.failures.check(client_ip)
        method = "api_key" if token.startswith(API_KEY_PREFIX) else "jwt"
        try:
            principal = await (self.api_keys.verify(token) if method == "api_key" else self.tokens.verify(token))
        except AppError as exc:
            AUTH_RESULTS.labels(method, "rejected" if exc.status == 401 else "error").inc()
            if exc.status == 401 and self.failures is not None and client_ip:
                await self.failures.failed(client_ip)
            raise
        AUTH_RESULTS.labels(method, "ok").inc()
        return principal
