"""Auth building blocks without servers: key pairs and JWKs, encryption at rest, passwords, roles."""
from __future__ import annotations

import ipaddress
from datetime import UTC

import pytest
from jose import jwk, jwt

from services.auth import keys as keymod
from services.auth.passwords import password_problem
from services.auth.service import ROLE_SCOPES, effective_rights, hash_password, verify_password
from services.chassis.clientip import client_address, parse_networks


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


def test_client_address_takes_the_right_most_untrusted_entry_and_ignores_the_header_by_default():
    """Issue 13: with no trusted proxy the header is ignored; with some, the client can't pick its
    address by prepending entries (the left part is whatever the client sent)."""
    assert client_address("127.0.0.1", "6.6.6.6", []) == "127.0.0.1"
    assert client_address("127.0.0.1", "6.6.6.6", parse_networks("")) == "127.0.0.1"
    lb = parse_networks("10.0.0.0/8, 127.0.0.1")
    # client sent "6.6.6.6"; the outer balancer (10.0.0.5) appended the real client 203.0.113.9
    assert client_address("127.0.0.1", "6.6.6.6, 203.0.113.9, 10.0.0.5", lb) == "203.0.113.9"
    assert client_address("10.1.2.3", "6.6.6.6,203.0.113.9", lb) == "203.0.113.9"
    assert client_address("10.1.2.3", "10.9.9.9", lb) == "10.9.9.9"  # every hop trusted: the left-most one
    assert client_address("10.1.2.3", "junk", lb) == "10.1.2.3"
    assert client_address("10.1.2.3", "[2001:db8::1]:443", lb) == "2001:db8::1"


@pytest.mark.parametrize("password", ["12345678", "short-pass", "123456789012345", "passwordpassword",
                                      "Password Password", "aaaaaaaaaaaaaaaaaaaa", "abababababababab",
                                      "qwertyuiopasdfgh", "aistack-aistack!", "x" * 1025])
def test_weak_passwords_are_refused(password):
    """NIST SP 800-63B rev. 4: 15 characters at least, blocklist, repeated characters (issue 13)."""
    assert password_problem(password) is not None


def test_long_passphrases_of_any_characters_are_accepted_and_context_words_refused():
    assert password_problem("lantern-orbit-7731") is None
    assert password_problem("çà et là, 🐘 sous la pluie") is None
    assert password_problem("x" * 10 + "y" * 10 + "z" * 44 + "long passphrase") is None  # >= 64 accepted
    assert password_problem("jean.dupont.1234", "jean.dupont.1234@example.test") is not None
    assert password_problem("jean.dupont.1234", "jean.dupont@example.test") is not None


def test_a_key_never_has_more_rights_than_its_owner_now():
    """Issue 13 defect 2: introspection intersects the key's scopes with the owner's current role."""
    assert effective_rights("admin", list(ROLE_SCOPES["admin"]), "admin") == ("admin", list(ROLE_SCOPES["admin"]))
    assert effective_rights("admin", list(ROLE_SCOPES["admin"]), "viewer") == ("viewer", ["features:read"])
    role, scopes = effective_rights("service", ["predict", "features:read"], "developer")
    assert role == "service" and scopes == ["predict", "features:read"]


def test_published_until_covers_ttl_cache_and_leeway():
    from datetime import datetime, timedelta

    t = datetime(2025, 1, 1, tzinfo=UTC)
    assert keymod.published_until(t, 900, 30) == t + timedelta(seconds=990)
    assert keymod.published_until(None, 900, 30) is None
