"""Gateway pieces without servers: token verification, JWKS refetch floor, rate-limit headers,
replica picking and ejection, the route table."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
import time

import pytest
from jose import jwt

from services.auth import keys as keymod
from services.chassis.errors import AppError
from services.chassis.upstream import UpstreamPool
from services.gateway.ratelimit import Bucket, Decision, approx_tokens
from services.gateway.routes import ROUTES
from services.gateway.security import JWKSCache, TokenVerifier, unauthorized

PRIVATE, PUBLIC = keymod.generate_keypair("RS256")
KID = "k1"
JWKS = {"keys": [keymod.public_jwk(PUBLIC, KID, "RS256")]}


def b64(doc) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def claims(**over):
    now = int(time.time())
    c = {"iss": "iss", "aud": "aud", "sub": "u1", "iat": now, "nbf": now, "exp": now + 60,
         "jti": secrets.token_hex(4), "scope": "predict jobs", "role": "developer"}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def sign(c, key=PRIVATE, kid=KID, alg="RS256"):
    return jwt.encode(c, key, algorithm=alg, headers={"kid": kid})


def verifier(fetches=None, min_refetch_s=60.0) -> TokenVerifier:
    async def fetch():
        if fetches is not None:
            fetches.append(time.monotonic())
        return JWKS
    return TokenVerifier(JWKSCache(fetch, 300, min_refetch_s), "iss", "aud", ["RS256", "ES256"], leeway_s=5)


async def test_a_good_token_gives_its_principal():
    p = await verifier().verify(sign(claims()))
    assert p.sub == "u1" and p.scopes == {"predict", "jobs"} and p.role == "developer"


def _hs256_with_public_key() -> str:
    signing_input = f"{b64({'alg': 'HS256', 'kid': KID})}.{b64(claims())}"
    sig = hmac.new(PUBLIC.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def _tampered() -> str:
    head, _, sig = sign(claims()).split(".")
    return f"{head}.{b64(claims(scope='admin'))}.{sig}"


BAD = {
    "alg_none": lambda: f"{b64({'alg': 'none', 'kid': KID})}.{b64(claims())}.",
    "hs256_with_public_key": _hs256_with_public_key,
    "expired": lambda: sign(claims(exp=int(time.time()) - 60)),
    "not_yet_valid": lambda: sign(claims(nbf=int(time.time()) + 60)),
    "wrong_aud": lambda: sign(claims(aud="other")),
    "wrong_iss": lambda: sign(claims(iss="other")),
    "unknown_kid": lambda: sign(claims(), key=keymod.generate_keypair("RS256")[0], kid="nope"),
    "right_kid_wrong_key": lambda: sign(claims(), key=keymod.generate_keypair("RS256")[0]),
    "tampered_payload": _tampered,
    "no_exp": lambda: sign(claims(exp=None)),
    "no_kid": lambda: jwt.encode(claims(), PRIVATE, algorithm="RS256"),
    "garbage": lambda: "a.b.c",
}


@pytest.mark.parametrize("name", sorted(BAD))
async def test_bad_tokens_are_401(name):
    with pytest.raises(AppError) as exc:
        await verifier().verify(BAD[name]())
    assert exc.value.status == 401 and exc.value.headers["WWW-Authenticate"].startswith("Bearer")


async def test_small_clock_skew_is_tolerated():
    await verifier().verify(sign(claims(nbf=int(time.time()) + 2)))
    await verifier().verify(sign(claims(exp=int(time.time()) - 2)))


async def test_unknown_kid_refetches_at_most_once_per_floor():
    fetches: list[float] = []
    v = verifier(fetches, min_refetch_s=60)
    await v.verify(sign(claims()))
    assert len(fetches) == 1
    for _ in range(5):
        with pytest.raises(AppError):
            await v.verify(sign(claims(), kid="rotated-away"))
    assert len(fetches) == 1  # within the floor: no stampede on auth
    v.jwks.attempted_at -= 61
    with pytest.raises(AppError):
        await v.verify(sign(claims(), kid="rotated-away"))
    assert len(fetches) == 2


def test_rate_limit_headers():
    d = Decision(False, 7.2, [(Bucket("requests", 60, 1), 0.4, 59.6)])
    h = d.headers()
    assert h == {"RateLimit-Limit": "60", "RateLimit-Remaining": "0", "RateLimit-Reset": "60",
                 "RateLimit-Policy": '60;w=60;comment="requests"', "Retry-After": "8"}
    assert "Retry-After" not in Decision(True, 0, [(Bucket("requests", 60, 1), 30, 30)]).headers()


def test_approx_tokens():
    assert approx_tokens(json.dumps({"input": "x" * 40}).encode()) == 10
    assert approx_tokens(json.dumps({"input": ["abcd", "efgh"]}).encode()) == 2
    assert approx_tokens(b"not json at all!") == 4


def test_pool_ejects_after_consecutive_failures_and_readmits():
    pool = UpstreamPool("o", ["http://a", "http://b"], eject_after=2, eject_s=0.05)
    a = pool.replicas[0]
    pool.record(a, ok=False)
    pool.record(a, ok=True)  # not consecutive
    pool.record(a, ok=False)
    assert a in pool.healthy()
    pool.record(a, ok=False)
    assert a not in pool.healthy()
    assert all(pool.pick() is pool.replicas[1] for _ in range(20))
    time.sleep(0.06)
    assert a in pool.healthy()


def test_pool_prefers_the_less_busy_of_two():
    pool = UpstreamPool("o", ["http://a", "http://b"])
    pool.replicas[0].outstanding = 5
    assert all(pool.pick() is pool.replicas[1] for _ in range(20))
    assert pool.pick(exclude=(pool.replicas[1],)) is pool.replicas[0]


def test_route_table_scopes():
    by_path = {}
    for r in ROUTES:
        by_path.setdefault(r.path, []).append(r)
    assert all(r.scope == "admin" for r in ROUTES if r.path.startswith("/admin"))
    assert by_path["/v1/predict/{model}"][0].scope == "predict"
    assert by_path["/v1/embeddings"][0].count_tokens
    assert by_path["/v1/features/push"][0].scope == "features:write"
    assert by_path["/v1/features/online"][0].scope == "features:read"
    assert {r.scope for r in by_path["/v1/jobs/{rest:path}"]} == {"jobs"}
    public = {r.path for r in ROUTES if r.scope is None}
    assert public == {"/v1/auth/token", "/v1/auth/refresh", "/v1/auth/logout", "/v1/auth/register",
                      "/.well-known/jwks.json"}


# -- issue 13: revocation from memory, malformed headers, failed-auth limit ------------------------
def _revocations(entries: dict, alive: bool = True):
    from services.gateway.revocation import RevocationMap

    m = RevocationMap(None, grace_s=3.0)
    m.entries = dict(entries)
    m.alive_at = time.monotonic() if alive else time.monotonic() - 10
    return m


def _checked(revocations) -> TokenVerifier:
    v = verifier()
    v.revocations = revocations
    return v


async def test_a_token_issued_before_its_users_or_sessions_not_before_is_refused():
    now = time.time()
    token = sign(claims(iat=round(now - 5, 3), sid="s1"))
    assert (await _checked(_revocations({"user:u2": now})).verify(token)).sub == "u1"
    for entry in ({"user:u1": now}, {"sid:s1": now}):
        with pytest.raises(AppError) as exc:
            await _checked(_revocations(entry)).verify(token)
        assert exc.value.status == 401 and exc.value.message == "token revoked"
    later = sign(claims(iat=round(now + 0.5, 3), sid="s1"))  # issued after the revocation
    assert (await _checked(_revocations({"user:u1": now})).verify(later)).sub == "u1"


async def test_revocations_fail_closed_when_the_subscription_is_down_past_the_grace():
    with pytest.raises(AppError) as exc:
        await _checked(_revocations({}, alive=False)).verify(sign(claims()))
    assert exc.value.status == 503 and exc.value.headers["Retry-After"]
    never = _revocations({})
    never.alive_at = None  # never subscribed
    with pytest.raises(AppError):
        never.not_before("user:u1")


def test_revocation_events_only_move_not_before_forward():
    m = _revocations({"user:u1": 100.0})
    m.apply(json.dumps({"subject": "user:u1", "not_before": 50.0}))
    m.apply(b"not json")
    m.apply(json.dumps({"subject": "user:u2", "not_before": 70.5}))
    assert m.entries == {"user:u1": 100.0, "user:u2": 70.5}


@pytest.mark.parametrize("header", [{"alg": ["RS256"], "kid": KID}, {"alg": {"x": 1}, "kid": KID},
                                    {"alg": "RS256\u00e9\u4e2d", "kid": KID}, {"alg": 'RS256"', "kid": KID},
                                    ["a"], "s", 1, None])
async def test_malformed_headers_are_401_with_an_ascii_challenge(header):
    """Issue 13 defect 6: alg as a list, an object, non-Latin-1, a quote: 401, never 500."""
    token = f"{b64(header)}.{b64(claims())}.c2ln"
    with pytest.raises(AppError) as exc:
        await verifier().verify(token)
    challenge = exc.value.headers["WWW-Authenticate"]
    assert exc.value.status == 401 and challenge.isascii() and challenge.count('"') % 2 == 0
    challenge.encode("latin-1")


def test_header_values_are_escaped():
    from services.gateway.security import header_safe, unauthorized

    assert header_safe('a"b\\c\u00e9\n') == "a?b?c??"
    challenge = unauthorized('token algorithm \'RS"256\' is not allowed').headers["WWW-Authenticate"]
    assert challenge.endswith('error_description="token algorithm \'RS?256\' is not allowed"')


async def test_failed_authentications_block_an_address_in_memory_after_the_limit():
    from services.gateway.security import FailedAuthLimiter

    class FakeRedis:
        def __init__(self):
            self.n = 0

        async def eval(self, script, nkeys, key, window):
            self.n += 1
            return [self.n, 60]

    limiter = FailedAuthLimiter(FakeRedis(), limit=3)
    for _ in range(2):
        await limiter.failed("192.0.2.1")
        limiter.check("192.0.2.1")
    await limiter.failed("192.0.2.1")
    with pytest.raises(AppError) as exc:
        limiter.check("192.0.2.1")
    assert exc.value.status == 429 and int(exc.value.headers["Retry-After"]) >= 1
    limiter.check("192.0.2.2")  # another address is not affected


def test_upstream_redirects_lose_their_internal_address():
    from services.gateway.service import public_location

    assert public_location("http://127.0.0.1:8001/admin/users?limit=5") == "/admin/users?limit=5"
    assert public_location("/admin/users") == "/admin/users"


async def test_a_verified_token_is_remembered_and_not_verified_again(monkeypatch):
    v = verifier()
    token = sign(claims())
    first = await v.verify(token)

    def no_decode(*a, **k):
        raise AssertionError("signature verified again")
    monkeypatch.setattr(v, "decode", no_decode)
    assert await v.verify(token) == first  # from memory: no RSA verification, no claims parse
    with pytest.raises(AssertionError):  # another token is verified as before
        await v.verify(sign(claims(sub="u2")))


async def test_a_remembered_token_still_follows_revocation_expiry_and_key_removal():
    now = time.time()
    revocations = _revocations({})
    v = _checked(revocations)
    token = sign(claims(iat=round(now - 5, 3), sid="s1"))
    assert (await v.verify(token)).sub == "u1"
    revocations.entries["sid:s1"] = now  # revoked after it was remembered: the next request says so
    with pytest.raises(AppError) as exc:
        await v.verify(token)
    assert exc.value.message == "token revoked"

    v = verifier()
    token = sign(claims())
    await v.verify(token)
    v._verified[token] = dataclasses.replace(v._verified[token], exp=now - 1)  # past its exp
    with pytest.raises(AppError) as exc:  # verified afresh (and within the leeway still valid)...
        v.decode = lambda *a: (_ for _ in ()).throw(unauthorized("token expired"))
        await v.verify(token)
    assert exc.value.message == "token expired"

    v = verifier()
    token = sign(claims())
    await v.verify(token)
    v.jwks.keys = {}  # its signing key left the JWKS
    with pytest.raises(AppError) as exc:
        await v.verify(token)
    assert exc.value.status == 401 and exc.value.message == "unknown signing key"


async def test_remembered_tokens_are_bounded():
    v = verifier()
    v.cache_size = 3
    tokens = [sign(claims(sub=f"u{i}")) for i in range(5)]
    for t in tokens:
        await v.verify(t)
    assert list(v._verified) == tokens[2:]  # the oldest went first
