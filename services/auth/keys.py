"""Signing keys: generated here, private parts encrypted at rest with Fernet, published as a JWKS.

Framework-free; used by the auth service and by `aistack keys rotate`.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from datetime import UTC, datetime, timedelta

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

log = logging.getLogger("aistack.auth.keys")

ALGORITHMS = ("RS256", "ES256")
_DEV_SECRET = b"aistack-development-key-encryption-key-do-not-use-in-production"


def fernet(key: str | None) -> Fernet:
    if not key:
        log.warning("AUTH_KEY_ENCRYPTION_KEY is not set: private signing keys are encrypted with a "
                    "fixed development key. Set it (a Fernet key) in any shared deployment.")
        key = base64.urlsafe_b64encode(hashlib.sha256(_DEV_SECRET).digest()).decode()
    return Fernet(key.encode() if isinstance(key, str) else key)


def generate_keypair(alg: str) -> tuple[str, str]:
    """A fresh (private PEM, public PEM) pair for RS256 (RSA 2048) or ES256 (P-256)."""
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r}; use one of {ALGORITHMS}")
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private_pem, public_pem


def new_kid() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(4)


def encrypt_private(f: Fernet, private_pem: str) -> bytes:
    return f.encrypt(private_pem.encode())


def decrypt_private(f: Fernet, blob: bytes) -> str:
    try:
        return f.decrypt(bytes(blob)).decode()
    except InvalidToken:
        raise RuntimeError("cannot decrypt a signing key: AUTH_KEY_ENCRYPTION_KEY is not the key "
                           "it was encrypted with") from None


def _b64u_uint(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64u_fixed(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def public_jwk(public_pem: str, kid: str, alg: str) -> dict:
    """RFC 7517 JWK of a public key, with kid, alg and use=sig."""
    key = serialization.load_pem_public_key(public_pem.encode())
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        body = {"kty": "RSA", "n": _b64u_uint(nums.n), "e": _b64u_uint(nums.e)}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        nums = key.public_numbers()
        body = {"kty": "EC", "crv": "P-256", "x": _b64u_fixed(nums.x, 32), "y": _b64u_fixed(nums.y, 32)}
    else:  # pragma: no cover - we only generate the two kinds above
        raise ValueError("unsupported public key type")  # noqa: TRY004
    return {**body, "kid": kid, "alg": alg, "use": "sig"}


def published_until(retired_at: datetime | None, access_ttl_s: int, key_cache_s: float,
                    leeway_s: int = 60) -> datetime | None:
    """A retired key stays in the JWKS until every token it may have signed has expired.

    Replicas may sign with it for up to key_cache_s after rotation, each token lives access_ttl_s,
    and verifiers allow some clock leeway.
    """
    if retired_at is None:
        return None
    return retired_at + timedelta(seconds=access_ttl_s + key_cache_s + leeway_s)
