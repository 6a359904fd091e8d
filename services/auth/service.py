"""Auth domain logic, framework-free: users and roles, password login with brute-force protection,
access tokens (JWT, asymmetric keys kept in Postgres), rotating refresh tokens, API keys.

Routes (api.py) and the CLI (cli.py) both call AuthService; nothing here knows about FastAPI.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from jose import jwk, jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError
from prometheus_client import Counter
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.chassis.errors import AppError

from . import keys as keymod
from .models import ApiKey, RefreshToken, SigningKey, User
from .passwords import check_password
from .revocation import Revocations
from .settings import AuthSettings

log = logging.getLogger("aistack.auth")

SCOPES = ("predict", "features:read", "features:write", "jobs", "admin")
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    "admin": SCOPES,
    "developer": ("predict", "features:read", "features:write", "jobs"),
    "service": ("predict", "features:read", "features:write"),
    "viewer": ("features:read",),
}
ROLES = tuple(ROLE_SCOPES)
API_KEY_PREFIX = "ak_"
REFRESH_PREFIX = "rt_"

LOGINS = Counter("aistack_auth_logins_total", "Password logins", ["result"])
LOCKOUTS = Counter("aistack_auth_lockouts_total", "Login lockouts started", ["scope"])
TOKENS_ISSUED = Counter("aistack_auth_tokens_issued_total", "Access tokens issued", ["grant"])
REFRESH_REUSE = Counter("aistack_auth_refresh_reuse_total", "Reused refresh tokens (family revoked)")
LIMITER_ERRORS = Counter("aistack_auth_login_limiter_errors_total",
                         "Login limiter checks skipped because Redis failed (fail-open)")

_hasher = PasswordHasher()
# Verified when the account does not exist, so that a miss costs as much time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def now() -> datetime:
    return datetime.now(UTC)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def unauthorized(message: str, code: str = "unauthorized", error: str = "invalid_token") -> AppError:
    return AppError(401, code, message,
                    headers={"WWW-Authenticate": f'Bearer realm="aistack", error="{error}"'})


def scopes_for(role: str) -> list[str]:
    if role not in ROLE_SCOPES:
        raise AppError(422, "unknown_role", f"unknown role {role!r}", {"roles": list(ROLES)})
    return list(ROLE_SCOPES[role])


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise AppError(422, "invalid_email", "not an email address")
    return email


def effective_rights(key_role: str, key_scopes: list[str], owner_role: str) -> tuple[str, list[str]]:
    """What a key may do now: its scopes within its owner's current role; its role, or the owner's
    when the owner's role grants less (a demoted owner demotes their keys)."""
    owner_scopes = set(ROLE_SCOPES.get(owner_role, ()))
    role = key_role if set(ROLE_SCOPES.get(key_role, ())) <= owner_scopes else owner_role
    return role, [s for s in key_scopes if s in owner_scopes]


# -- passwords --------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user (by access token) or an API key."""

    sub: str
    kind: str  # "user" | "api_key"
    role: str
    scopes: frozenset[str]
    claims: dict = field(default_factory=dict, compare=False)

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise AppError(403, "insufficient_scope", f"this needs scope {scope!r}", {"required": scope},
                           headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'})


@dataclass
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    scope: str
    token_type: str = "bearer"


# -- brute-force protection -------------------------------------------------------------------
# Reserve one attempt per target before the password is verified (issue 13: N concurrent guesses
# must verify at most the limit). KEYS: per target (fail counter, lock). ARGV: window, lockout,
# then one limit per target. Returns 0 (reserved), or the seconds left of a lock on target i
# as {i, ttl}. A reservation that reaches the limit starts the lock for the next attempt at once.
_RESERVE = """
local n = #KEYS / 2
for i = 1, n do
  local ttl = redis.call('TTL', KEYS[2*i])
  if ttl and ttl > 0 then return {i, ttl} end
end
for i = 1, n do
  local c = redis.call('INCR', KEYS[2*i-1])
  if c == 1 then redis.call('EXPIRE', KEYS[2*i-1], ARGV[1]) end
  if c >= tonumber(ARGV[2+i]) then
    redis.call('SET', KEYS[2*i], '1', 'EX', ARGV[2])
    redis.call('DEL', KEYS[2*i-1])
  end
end
return 0
"""


class LoginLimiter:
    """Login attempts counted per account and per client address in Redis; too many locks out.

    Every attempt is counted *before* its password is verified (an atomic reserve), and a success
    gives the account's count back: so concurrent guesses can never verify more than the limit.
    """

    def __init__(self, redis, settings: AuthSettings):
        self.redis, self.s = redis, settings
        self.script = redis.register_script(_RESERVE)

    @staticmethod
    def _keys(kind: str, ident: str) -> tuple[str, str]:
        h = sha256_hex(ident)[:32]
        return f"auth:login:fail:{kind}:{h}", f"auth:login:lock:{kind}:{h}"

    def _targets(self, email: str, ip: str | None):
        yield "account", email, self.s.login_max_failures_per_account
        if ip:
            yield "ip", ip, self.s.login_max_failures_per_ip

    async def reserve(self, email: str, ip: str | None) -> None:
        """Count this attempt, or answer 429 when the account or the address is locked out."""
        targets = list(self._targets(email, ip))
        keys = [k for kind, ident, _ in targets for k in self._keys(kind, ident)]
        try:
            out = await self.script(keys=keys, args=[self.s.login_window_s, self.s.login_lockout_s,
                                                     *[limit for _, _, limit in targets]])
        except Exception as exc:  # Redis down: do not lock everyone out; count it  # noqa: BLE001
            LIMITER_ERRORS.inc()
            log.warning("login limiter unavailable: %s", exc)
            return
        if out and out != 0 and isinstance(out, list):
            kind, ttl = targets[int(out[0]) - 1][0], int(out[1])
            LOCKOUTS.labels(kind).inc()
            raise AppError(429, "login_locked", f"too many failed logins for this {kind}; try again later",
                           {"scope": kind, "retry_after_s": ttl}, headers={"Retry-After": str(ttl)})

    async def succeeded(self, email: str, ip: str | None = None) -> None:
        """The right password: the account's count and lock go, the address gets its attempt back."""
        try:
            await self.redis.delete(*self._keys("account", email))
            if ip:
                await self.redis.eval("if (tonumber(redis.call('GET', KEYS[1]) or '0')) > 0 then "
                                      "redis.call('DECR', KEYS[1]) end return 0", 1, self._keys("ip", ip)[0])
        except Exception:  # noqa: BLE001
            LIMITER_ERRORS.inc()


# -- signing keys -----------------------------------------------------------------------------
@dataclass
class _ActiveKey:
    kid: str
    alg: str
    private_pem: str


class KeyRing:
    """The signing key in use and the published public keys, cached for key_cache_s."""

    def __init__(self, sessions: async_sessionmaker, settings: AuthSettings):
        self.sessions, self.s = sessions, settings
        self.fernet = keymod.fernet(settings.key_encryption_key)
        self._active: _ActiveKey | None = None
        self._public: dict[str, tuple[dict, object]] = {}  # kid -> (jwk dict, jose key)
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def ensure(self) -> None:
        """Create the first key if there is none (safe with several replicas starting at once)."""
        async with self.sessions.begin() as session:
            await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('aistack.auth.signing_keys'))"))
            current = await session.scalar(select(SigningKey).where(SigningKey.retired_at.is_(None)))
            if current is None:
                await self._add_key(session)
        self._loaded_at = 0.0

    async def rotate(self) -> str:
        """A new key signs from now on; the old public key stays published until its tokens expired."""
        async with self.sessions.begin() as session:
            await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('aistack.auth.signing_keys'))"))
            await session.execute(update(SigningKey).where(SigningKey.retired_at.is_(None))
                                  .values(retired_at=now()))
            kid = await self._add_key(session)
            # Forget keys whose every token has expired.
            horizon = now() - timedelta(seconds=self.s.access_ttl_s + self.s.key_cache_s + 60)
            old = await session.scalars(select(SigningKey).where(SigningKey.retired_at < horizon))
            for key in old:
                await session.delete(key)
        self._loaded_at = 0.0
        log.info("signing key rotated; new kid %s", kid)
        return kid

    async def _add_key(self, session: AsyncSession) -> str:
        private_pem, public_pem = await asyncio.to_thread(keymod.generate_keypair, self.s.signing_alg)
        kid = keymod.new_kid()
        session.add(SigningKey(kid=kid, alg=self.s.signing_alg, public_pem=public_pem,
                               private_enc=keymod.encrypt_private(self.fernet, private_pem), created_at=now()))
        await session.flush()
        return kid

    async def _load(self, force: bool = False) -> None:
        if not force and self._active and time.monotonic() - self._loaded_at < self.s.key_cache_s:
            return
        async with self._lock:
            if not force and self._active and time.monotonic() - self._loaded_at < self.s.key_cache_s:
                return
            async with self.sessions() as session:
                rows = list(await session.scalars(select(SigningKey).order_by(SigningKey.created_at.desc())))
            t = now()
            active, public = None, {}
            for row in rows:
                until = keymod.published_until(row.retired_at, self.s.access_ttl_s, self.s.key_cache_s)
                if until is not None and until < t:
                    continue
                jwk_dict = keymod.public_jwk(row.public_pem, row.kid, row.alg)
                public[row.kid] = (jwk_dict, jwk.construct(jwk_dict, row.alg))
                if row.retired_at is None and active is None:
                    active = _ActiveKey(row.kid, row.alg, keymod.decrypt_private(self.fernet, row.private_enc))
            if active is None:
                raise AppError(503, "no_signing_key", "no active signing key; run `aistack keys rotate`",
                               headers={"Retry-After": "5"})
            self._active, self._public, self._loaded_at = active, public, time.monotonic()

    async def active(self) -> _ActiveKey:
        await self._load()
        return self._active

    async def jwks(self) -> dict:
        await self._load()
        return {"keys": [j for j, _ in self._public.values()]}

    async def public_key(self, kid: str):
        await self._load()
        if kid not in self._public:
            await self._load(force=True)
        return self._public.get(kid, (None, None))[1]


# -- the service ------------------------------------------------------------------------------
class AuthService:
    def __init__(self, engine: AsyncEngine, redis, settings: AuthSettings):
        self.s = settings
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.redis = redis
        self.keys = KeyRing(self.sessions, settings)
        self.limiter = LoginLimiter(redis, settings) if redis is not None else None
        # Entries outlive every access token and every gateway key cache they could refuse.
        self.revocations = Revocations(self.sessions, redis, settings.access_ttl_s + settings.revocation_margin_s,
                                       settings.revocation_sync_s)

    # users ------------------------------------------------------------------------------------
    async def create_user(self, email: str, password: str, role: str = "viewer") -> User:
        scopes_for(role)
        check_password(password, email)
        user = User(id=uuid.uuid4(), email=normalize_email(email),
                    password_hash=await asyncio.to_thread(hash_password, password), role=role, disabled=False)
        try:
            async with self.sessions.begin() as session:
                session.add(user)
        except IntegrityError:
            raise AppError(409, "user_exists", "a user with this email already exists") from None
        log.info("user created with role %s", role)
        return user

    async def list_users(self, limit: int = 100, offset: int = 0) -> list[User]:
        async with self.sessions() as session:
            rows = await session.scalars(select(User).order_by(User.created_at, User.email)
                                         .limit(limit).offset(offset))
            return list(rows)

    async def get_user(self, user_id: str | uuid.UUID) -> User:
        try:
            uid = uuid.UUID(str(user_id))
        except ValueError:
            raise AppError(404, "user_not_found", "no such user") from None
        async with self.sessions() as session:
            user = await session.get(User, uid)
        if user is None:
            raise AppError(404, "user_not_found", "no such user")
        return user

    async def update_user(self, user_id: str, *, role: str | None = None, disabled: bool | None = None) -> User:
        user = await self.get_user(user_id)
        values = {}
        if role is not None:
            scopes_for(role)
            values["role"] = role
        if disabled is not None:
            values["disabled"] = disabled
        if values:
            async with self.sessions.begin() as session:
                await session.execute(update(User).where(User.id == user.id).values(**values))
                if disabled:  # a disabled user's sessions end now
                    await session.execute(update(RefreshToken).where(
                        RefreshToken.user_id == user.id, RefreshToken.revoked_at.is_(None)).values(revoked_at=now()))
            if (role is not None and role != user.role) or (disabled and not user.disabled):
                # Rights follow the account: tokens and keys issued under the old state die everywhere.
                await self.revocations.revoke(f"user:{user.id}")
        return await self.get_user(user_id)

    async def sign_out_everywhere(self, user_id: str) -> int:
        """End every session of a user and every access token issued so far."""
        user = await self.get_user(user_id)
        async with self.sessions.begin() as session:
            n = (await session.execute(update(RefreshToken).where(
                RefreshToken.user_id == user.id, RefreshToken.revoked_at.is_(None)).values(revoked_at=now()))).rowcount
        await self.revocations.revoke(f"user:{user.id}")
        return n

    async def admin_exists(self) -> bool:
        async with self.sessions() as session:
            n = await session.scalar(select(func.count()).select_from(User)
                                     .where(User.role == "admin", User.disabled.is_(False)))
        return bool(n)

    async def bootstrap_admin(self, email: str | None, password: str | None) -> bool:
        """Create (or promote) the first admin from settings; does nothing once an admin exists."""
        if not email or not password:
            return False
        email = normalize_email(email)
        try:  # the first admin obeys the password rules too: refuse to start with a weak one
            check_password(password, email, setting="AUTH_BOOTSTRAP_ADMIN_PASSWORD")
        except AppError as exc:
            raise RuntimeError(exc.message) from None
        pw_hash = await asyncio.to_thread(hash_password, password)
        async with self.sessions.begin() as session:
            await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('aistack.auth.bootstrap'))"))
            n = await session.scalar(select(func.count()).select_from(User)
                                     .where(User.role == "admin", User.disabled.is_(False)))
            if n:
                return False
            user = await session.scalar(select(User).where(User.email == email))
            if user is None:
                session.add(User(id=uuid.uuid4(), email=email, password_hash=pw_hash, role="admin", disabled=False))
            else:
                user.role, user.disabled, user.password_hash = "admin", False, pw_hash
        log.info("bootstrap admin created")
        return True

    # login and tokens -------------------------------------------------------------------------
    async def login(self, email: str, password: str, ip: str | None = None) -> TokenPair:
        email = email.strip().lower()
        if self.limiter:
            await self.limiter.reserve(email, ip)
        issued = time.time()  # before the read: a revocation after it makes this token stale
        async with self.sessions() as session:
            user = await session.scalar(select(User).where(User.email == email))
        ok = await asyncio.to_thread(verify_password, user.password_hash if user else _DUMMY_HASH, password)
        if not ok or user is None or user.disabled:
            LOGINS.labels("failure").inc()
            raise AppError(401, "invalid_credentials", "wrong email or password",
                           headers={"WWW-Authenticate": 'Bearer realm="aistack"'})
        if self.limiter:
            await self.limiter.succeeded(email, ip)
        LOGINS.labels("success").inc()
        async with self.sessions.begin() as session:
            return await self._issue(session, user, uuid.uuid4(), grant="password", issued=issued)

    async def _issue(self, session: AsyncSession, user: User, family_id: uuid.UUID, grant: str,
                     issued: float) -> TokenPair:
        """`issued`: when the user row was read; the token's iat, so that a revocation committed
        after that read always finds the token older than its not-before."""
        scopes = scopes_for(user.role)
        access = await self.access_token(str(user.id), user.role, scopes, issued=issued, sid=str(family_id))
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        t = now()
        session.add(RefreshToken(id=uuid.uuid4(), token_hash=sha256_hex(refresh), family_id=family_id,
                                 user_id=user.id, created_at=t,
                                 expires_at=t + timedelta(seconds=self.s.refresh_ttl_s)))
        TOKENS_ISSUED.labels(grant).inc()
        return TokenPair(access, refresh, self.s.access_ttl_s, " ".join(scopes))

    async def access_token(self, sub: str, role: str, scopes: list[str], ttl_s: int | None = None,
                           issued: float | None = None, **extra) -> str:
        """iat has millisecond precision (a NumericDate may be fractional, RFC 7519): revocation
        compares it with a not-before time, and a whole second would blur that by up to 1 s."""
        key = await self.keys.active()
        issued = round(issued if issued is not None else time.time(), 3)
        claims = {"iss": self.s.issuer, "aud": self.s.audience, "sub": sub, "iat": issued, "nbf": int(issued),
                  "exp": int(issued) + (ttl_s or self.s.access_ttl_s), "jti": secrets.token_hex(16),
                  "scope": " ".join(scopes), "role": role, **extra}
        return jwt.encode(claims, key.private_pem, algorithm=key.alg, headers={"kid": key.kid})

    async def refresh(self, token: str) -> TokenPair:
        """Rotate: the presented token is spent and a new one issued; a spent token revokes its family."""
        reused, family = False, None
        issued = time.time()
        async with self.sessions.begin() as session:
            row = await session.scalar(select(RefreshToken).where(RefreshToken.token_hash == sha256_hex(token))
                                       .with_for_update())
            if row is None:
                raise unauthorized("unknown refresh token", "invalid_grant", "invalid_grant")
            if row.used_at is not None or row.revoked_at is not None:
                family = row.family_id if row.revoked_at is None else None
                await session.execute(update(RefreshToken).where(
                    RefreshToken.family_id == row.family_id, RefreshToken.revoked_at.is_(None))
                    .values(revoked_at=now()))
                reused = row.used_at is not None
            elif row.expires_at < now():
                raise unauthorized("refresh token expired", "invalid_grant", "invalid_grant")
            else:
                user = await session.get(User, row.user_id)
                if user is None or user.disabled:
                    raise unauthorized("account disabled", "invalid_grant", "invalid_grant")
                row.used_at = now()
                return await self._issue(session, user, row.family_id, grant="refresh_token", issued=issued)
        if family is not None:  # the session is over: its access tokens too
            await self.revocations.revoke(f"sid:{family}")
        if reused:
            REFRESH_REUSE.inc()
            log.warning("refresh token reuse: family revoked")
            raise unauthorized("refresh token already used; its session has been revoked",
                               "refresh_token_reused", "invalid_grant")
        raise unauthorized("refresh token revoked", "invalid_grant", "invalid_grant")

    async def logout(self, token: str) -> None:
        """Revoke the whole session (the token's family). Unknown tokens are ignored."""
        async with self.sessions.begin() as session:
            family = await session.scalar(select(RefreshToken.family_id)
                                          .where(RefreshToken.token_hash == sha256_hex(token)))
            if family is not None:
                await session.execute(update(RefreshToken).where(
                    RefreshToken.family_id == family, RefreshToken.revoked_at.is_(None)).values(revoked_at=now()))
        if family is not None:  # the session's access tokens die with it, at every gateway
            await self.revocations.revoke(f"sid:{family}")

    async def verify_access(self, token: str) -> Principal:
        """Check an access token against our own published keys (what the gateway does via JWKS)."""
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # noqa: BLE001 - any undecodable header is the caller's 401, never a 500
            raise unauthorized("malformed token") from None
        alg, kid = (header.get("alg"), header.get("kid")) if isinstance(header, dict) else (None, None)
        if not isinstance(alg, str) or alg not in keymod.ALGORITHMS:
            raise unauthorized("token algorithm not allowed")
        if not isinstance(kid, str):
            raise unauthorized("token has no kid")
        key = await self.keys.public_key(kid)
        if key is None:
            raise unauthorized("unknown signing key")
        try:
            claims = jwt.decode(token, key, algorithms=list(keymod.ALGORITHMS), audience=self.s.audience,
                                issuer=self.s.issuer, options={
                                    "leeway": 10, "require_exp": True, "require_iat": True, "require_nbf": True,
                                    "require_iss": True, "require_aud": True, "require_sub": True,
                                    "require_jti": True})
        except ExpiredSignatureError:
            raise unauthorized("token expired") from None
        except (JWTClaimsError, JWTError) as exc:
            raise unauthorized(f"invalid token: {exc}") from None
        if not isinstance(claims.get("scope", ""), str) or not isinstance(claims.get("sub"), str):
            raise unauthorized("invalid token claims")
        return Principal(claims["sub"], "user", str(claims.get("role", "")),
                         frozenset(claims.get("scope", "").split()), claims)

    async def current(self, principal: Principal) -> Principal:
        """A token's principal with the account's current rights: refused when the account is gone,
        disabled, or revoked the token (logout, role change...); scopes never beyond the current role."""
        try:
            user = await self.get_user(principal.sub)
        except AppError:  # erased (docs/privacy.md): its access tokens die with it
            raise unauthorized("account disabled") from None
        if user.disabled:
            raise unauthorized("account disabled")
        subjects = [f"user:{user.id}"] + ([f"sid:{principal.claims['sid']}"] if principal.claims.get("sid") else [])
        iat = principal.claims.get("iat")
        if not isinstance(iat, (int, float)) or iat < await self.revocations.not_before(*subjects):
            raise unauthorized("token revoked")
        scopes = principal.scopes & frozenset(ROLE_SCOPES.get(user.role, ()))
        return Principal(principal.sub, "user", user.role, scopes, principal.claims)

    # API keys ---------------------------------------------------------------------------------
    async def create_api_key(self, name: str, role: str = "service", scopes: list[str] | None = None,
                             expires_in_s: int | None = None, rate_limit_rpm: int | None = None,
                             owner_id: str | None = None) -> tuple[ApiKey, str]:
        """Returns the stored row and the key itself, which is shown this once and never again.

        Every key has an owner (a user): the key acts with at most that user's current rights."""
        if not owner_id:
            raise AppError(422, "owner_required", "an API key needs an owning user")
        allowed = set(scopes_for(role))
        scopes = list(dict.fromkeys(scopes)) if scopes else sorted(allowed)
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise AppError(422, "unknown_scope", f"unknown scopes: {', '.join(unknown)}", {"scopes": list(SCOPES)})
        beyond = [s for s in scopes if s not in allowed]
        if beyond:
            raise AppError(422, "scope_beyond_role", f"role {role} does not grant {', '.join(beyond)}")
        prefix = secrets.token_hex(4)
        key = f"{API_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        t = now()
        row = ApiKey(id=uuid.uuid4(), prefix=prefix, key_hash=sha256_hex(key), name=name,
                     owner_id=uuid.UUID(str(owner_id)), role=role, scopes=scopes,
                     rate_limit_rpm=rate_limit_rpm, created_at=t,
                     expires_at=t + timedelta(seconds=expires_in_s) if expires_in_s else None)
        async with self.sessions.begin() as session:
            session.add(row)
        return row, key

    async def list_api_keys(self) -> list[ApiKey]:
        async with self.sessions() as session:
            return list(await session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        try:
            kid = uuid.UUID(str(key_id))
        except ValueError:
            raise AppError(404, "api_key_not_found", "no such API key") from None
        async with self.sessions.begin() as session:
            row = await session.get(ApiKey, kid)
            if row is None:
                raise AppError(404, "api_key_not_found", "no such API key")
            newly = row.revoked_at is None
            if newly:  # the row stays: apikey:<id> must keep mapping to its owner (docs/privacy.md)
                row.revoked_at = now()
        if newly:
            await self.revocations.revoke(f"apikey:{row.id}")
        return row

    async def introspect_api_key(self, key: str) -> dict:
        """RFC 7662-like answer for an API key: {"active": false} unless it is valid now."""
        inactive = {"active": False}
        parts = key.split("_", 2) if key.startswith(API_KEY_PREFIX) else []
        if len(parts) != 3:
            return inactive
        answered = round(time.time(), 3)  # before the reads: see Revocations.revoke
        async with self.sessions() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
            owner = await session.get(User, row.owner_id) if row is not None and row.owner_id else None
        if row is None or not hmac.compare_digest(row.key_hash, sha256_hex(key)):
            return inactive
        t = now()
        if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= t):
            return inactive
        if owner is None or owner.disabled:  # a key is never more than its owner
            return inactive
        role, scopes = effective_rights(row.role, row.scopes, owner.role)
        if row.last_used_at is None or (t - row.last_used_at).total_seconds() >= self.s.api_key_touch_s:
            async with self.sessions.begin() as session:
                await session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=t))
        return {"active": True, "sub": f"apikey:{row.id}", "key_id": str(row.id), "name": row.name,
                "owner": str(owner.id), "role": role, "scope": " ".join(scopes), "rate_limit_rpm": row.rate_limit_rpm,
                "exp": int(row.expires_at.timestamp()) if row.expires_at else None, "iat": answered}

    async def principal_from_api_key(self, key: str) -> Principal:
        info = await self.introspect_api_key(key)
        if not info["active"]:
            raise unauthorized("invalid or revoked API key")
        return Principal(info["sub"], "api_key", info["role"], frozenset(info["scope"].split()), info)
