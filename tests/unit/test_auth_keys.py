"""Auth building blocks without servers: key pairs and JWKs, encryption at rest, passwords, roles."""
from __future__ import annotations

import ipaddress
from datetime import UTC

import pytest
from jose import jwk, jwt

from services.auth import keys as keymod
from services.auth.service import ROLE_SCOPES, client_address, hash_password, verify_password


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_jwk_verifies_what_the_private_key_signs(alg):
    private, public = keymod.generate_keypair(alg)
    entry = keymod.public_jwk(public, "kid1", alg)
    assert entry["kid"] == "kid1" and entry["alg"] == alg and entry["use"] == "sig"
    assert "d" not in entry
    token = jwt.encode({"sub": "x"}, private, algorithm=alg, headers={"kid": "kid1"})
    assert jwt.decode(token, jwk.construct(entry, alg), algorithms=[alg]) == {"sub": "x"}


def test_private_key_encryption_round_trip_and_wrong_key():
    from cryptography.fernet import Fernet

    private, _ = keymod.generate_keypair("RS256")
    f = keymod.fernet(Fernet.generate_key().decode())
    blob = keymod.encrypt_private(f, private)
    assert b"PRIVATE" not in blob and keymod.decrypt_private(f, blob) == private
    with pytest.raises(RuntimeError, match="AUTH_KEY_ENCRYPTION_KEY"):
        keymod.decrypt_private(keymod.fernet(Fernet.generate_key().decode()), blob)


def test_argon2_passwords():
    h = hash_password("s3cret-pass")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "s3cret-pass") and not verify_password(h, "wrong")
    assert not verify_password("not-a-hash", "x")


def test_roles_map_to_scopes():
    assert set(ROLE_SCOPES["admin"]) == {"predict", "features:read", "features:write", "jobs", "admin"}
    assert "admin" not in ROLE_SCOPES["developer"] and ROLE_SCOPES["viewer"] == ("features:read",)


def test_client_address_believes_forwarded_for_only_from_trusted_proxies():
    trusted = [ipaddress.ip_network("127.0.0.0/8")]
    assert client_address("127.0.0.1", "1.2.3.4, 5.6.7.8", trusted) == "5.6.7.8"
    assert client_address("9.9.9.9", "5.6.7.8", trusted) == "9.9.9.9"
    assert client_address("127.0.0.1", None, trusted) == "127.0.0.1"


def test_published_until_covers_ttl_cache_and_leeway():
    from datetime import datetime, timedelta

    t = datetime(2025, 1, 1, tzinfo=UTC)
    assert keymod.published_until(t, 900, 30) == t + timedelta(seconds=990)
    assert keymod.published_until(None, 900, 30) is None
