"""PII features: encryption at rest with Fernet, key rotation with MultiFernet (services/features/pii.py)."""
from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from services.features.online import OnlineRow
from services.features.pii import MARK, PiiCipher, PiiKeyError, is_sealed
from services.features.schemas import FeatureView
from services.features.service import FeatureStore


def test_seal_hides_the_value_and_open_restores_it_with_its_type():
    c = PiiCipher(Fernet.generate_key().decode())
    for value in ("alice@example.com", 42, 3.5, True):
        sealed = c.seal(value)
        assert is_sealed(sealed) and list(sealed) == [MARK]
        assert str(value) not in sealed[MARK]
        assert c.open(sealed) == value and type(c.open(sealed)) is type(value)
    assert c.seal(None) is None and c.open(None) is None
    assert c.open("plain") == "plain"  # plain values pass through untouched
    assert c.seal(c.seal("x"))[MARK]  # sealing twice does not double-encrypt
    assert c.open(c.seal(c.seal("x"))) == "x"


def test_a_wrong_key_cannot_open():
    sealed = PiiCipher(Fernet.generate_key().decode()).seal("secret")
    with pytest.raises(PiiKeyError) as err:
        PiiCipher(Fernet.generate_key().decode()).open(sealed)
    assert "secret" not in str(err.value)


def test_rotation_reencrypts_with_the_new_key_and_old_keys_can_then_go():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealed_old = PiiCipher(old).seal("555-0100")
    during = PiiCipher(f"{new},{old}")  # new key first, old one kept for reading
    assert during.open(sealed_old) == "555-0100"
    assert not during.current(sealed_old)
    rotated = during.reseal(sealed_old)
    assert rotated is not None and during.current(rotated)
    assert during.reseal(rotated) is None  # already current: nothing to do (resumable)
    assert PiiCipher(new).open(rotated) == "555-0100"  # old key dropped: still readable
    with pytest.raises(PiiKeyError):
        PiiCipher(new).open(sealed_old)
    # A plain value of a feature that became PII gets sealed by the rotation.
    assert during.open(during.reseal("plain")) == "plain"


def test_bad_key_setting_fails_with_the_variable_name():
    with pytest.raises(RuntimeError, match="FEATURES_PII_KEYS"):
        PiiCipher("not-a-fernet-key")


def test_unset_keys_fall_back_to_a_development_key():
    a, b = PiiCipher(None), PiiCipher("")
    assert b.open(a.seal("x")) == "x"


def test_feature_store_seals_only_pii_features():
    store = FeatureStore(engine=None, pii_keys=Fernet.generate_key().decode())
    view = FeatureView(name="people", entity="customer", version=1, features=[
        {"name": "email", "dtype": "string", "pii": True}, {"name": "score", "dtype": "float"}])
    [row] = store.seal_rows(view, [OnlineRow("C1", 1, {"email": "bob@example.com", "score": 0.5})])
    assert row.values["score"] == 0.5 and is_sealed(row.values["email"])
    assert "bob" not in repr(row)
    assert store.pii.open_values(row.values) == {"email": "bob@example.com", "score": 0.5}
