"""Encryption at rest of PII features (FeatureSpec.pii) with Fernet, keys rotated with MultiFernet.

A sealed value is the JSON object {"$pii": "<Fernet token of the JSON value>"}: feature values are
ints, floats, strings, bools or null, never objects, so a sealed value cannot be mistaken for a
plain one and reads open any sealed value whatever the registry says now. Sealed values are what
both stores hold: the offline rows in Postgres and the online hashes in Redis (materialisation
copies the token as it is). Values are opened only to answer a read.

Keys: FEATURES_PII_KEYS, comma-separated Fernet keys, the first one encrypts, every one decrypts.
Rotation: put a new key first, keep the old ones, run `aistack features rotate-pii-key` (or
POST /admin/features/pii/rotate) which re-encrypts every sealed value with the first key (and
seals plain values of features that became PII); then the old keys can be dropped.
"""
from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("aistack.features.pii")

MARK = "$pii"
_DEV_SECRET = b"aistack-development-pii-key-do-not-use-in-production"


class PiiKeyError(RuntimeError):
    """A sealed value none of the configured keys opens."""


def dev_key() -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(_DEV_SECRET).digest()).decode()


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(MARK), str)


class PiiCipher:
    def __init__(self, keys: str | list[str] | None):
        if isinstance(keys, str):
            keys = [k.strip() for k in keys.split(",") if k.strip()]
        if not keys:
            log.warning("FEATURES_PII_KEYS is not set: PII features are encrypted with a fixed development "
                        "key. Set it (comma-separated Fernet keys, newest first) in any shared deployment.")
            keys = [dev_key()]
        try:
            self._fernets = [Fernet(k.encode() if isinstance(k, str) else k) for k in keys]
        except (ValueError, TypeError):
            raise RuntimeError("FEATURES_PII_KEYS: every key must be a Fernet key (32 url-safe base64 bytes); "
                               "make one with `python -c 'from cryptography.fernet import Fernet; "
                               "print(Fernet.generate_key().decode())'`") from None
        self._primary = self._fernets[0]
        self._multi = MultiFernet(self._fernets)

    def seal(self, value: Any) -> Any:
        """Encrypt one value (null stays null: nothing to hide, and reads report it missing)."""
        if value is None or is_sealed(value):
            return value
        return {MARK: self._primary.encrypt(orjson.dumps(value)).decode()}

    def open(self, value: Any) -> Any:
        if not is_sealed(value):
            return value
        try:
            return orjson.loads(self._multi.decrypt(value[MARK].encode()))
        except InvalidToken:
            raise PiiKeyError("a PII value cannot be decrypted with any key in FEATURES_PII_KEYS") from None

    def current(self, value: Any) -> bool:
        """True if the value is sealed with the first (current) key."""
        if not is_sealed(value):
            return False
        try:
            self._primary.decrypt(value[MARK].encode())
            return True
        except InvalidToken:
            return False

    def reseal(self, value: Any) -> Any:
        """Re-encrypt with the current key (plain values get sealed); None if nothing changes."""
        if value is None or self.current(value):
            return None
        if not is_sealed(value):
            return self.seal(value)
        try:
            return {MARK: self._multi.rotate(value[MARK].encode()).decode()}
        except InvalidToken:
            raise PiiKeyError("a PII value cannot be decrypted with any key in FEATURES_PII_KEYS") from None

    def seal_values(self, values: dict[str, Any], pii: set[str] | frozenset[str]) -> dict[str, Any]:
        if not pii:
            return values
        return {k: (self.seal(v) if k in pii else v) for k, v in values.items()}

    def open_values(self, values: dict[str, Any] | None) -> dict[str, Any] | None:
        if not values:
            return values
        return {k: self.open(v) for k, v in values.items()}
