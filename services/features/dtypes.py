"""Feature value types and their bounds, checked before anything is written (docs/features.md).

Every bound here exists because a store downstream refuses what lies beyond it: orjson and JSON
consumers stop at signed 64-bit ints, Postgres text and JSONB refuse NUL and lone surrogates,
Python's datetime stops at year 9999. A value outside a bound is the caller's error (422), never
a half-written row.
"""
from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_STRING_CHARS = 65_536
MAX_KEY_CHARS = 512
MAX_TTL_SECONDS = 50 * 365 * 86400  # 50 years; the registry column is a 32-bit integer
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Python's datetime range less its very first instant, which asyncpg stores as Postgres' -infinity.
TIME_MIN = datetime(1, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)
TIME_MAX = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
TIME_RANGE = "0001-01-01T00:00:00.001Z .. 9999-12-31T23:59:59.999Z"

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string"}


def type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def plain(value: Any) -> Any:
    """numpy / pandas scalars to Python ones; NaN and NaT to None (what files give us)."""
    if value is None:
        return None
    item = getattr(value, "item", None)
    if item is not None and not isinstance(value, (str, bytes)):
        try:
            value = item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def check_text(value: str, limit: int = MAX_STRING_CHARS) -> str:
    """Text both stores can hold: bounded, no NUL (Postgres refuses it), valid Unicode (no lone surrogates)."""
    if len(value) > limit:
        raise ValueError(f"string longer than {limit} characters")
    if "\x00" in value:
        raise ValueError("string contains NUL (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string is not valid Unicode (lone surrogate)") from None
    return value


def check_int(value: int) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"int out of range: a feature int is signed 64-bit ({INT_MIN} .. {INT_MAX})")
    return value


def check_value(dtype: str, value: Any) -> Any:
    """The value as the registry's dtype, or ValueError naming the bound. Strict: no strings for numbers."""
    if value is None:
        return None
    if dtype == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                as_float = float(value)
            except OverflowError:
                raise ValueError("float out of range: not representable as an IEEE 754 double") from None
            if not math.isfinite(as_float):
                raise ValueError("expected a finite float (no NaN or infinity)")
            return as_float
    elif dtype == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return check_int(value)
        if isinstance(value, float) and value.is_integer():
            return check_int(int(value))
    elif dtype == "string" and isinstance(value, str):
        return check_text(value)
    elif dtype == "bool" and isinstance(value, bool):
        return value
    raise ValueError(f"expected {dtype}, got {type_name(value)}")


def parse_time(value: Any) -> datetime:
    """ISO 8601 string, datetime or epoch seconds -> aware UTC datetime (naive means UTC), truncated
    to the millisecond and inside TIME_RANGE; ValueError otherwise (never Overflow/OSError)."""
    value = plain(value)
    if hasattr(value, "to_pydatetime"):
        value = value.to_pydatetime()
    try:
        if isinstance(value, datetime):
            dt = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("expected a finite epoch time")
            # Exact for ints; floats keep what a double holds. No platform time_t limits.
            dt = EPOCH + timedelta(seconds=value)
        elif isinstance(value, str):
            dt = datetime.fromisoformat(value)
        else:
            raise ValueError(  # noqa: TRY004 - callers report ValueErrors as the field's error
                f"expected an ISO 8601 time or epoch seconds, got {type_name(value)}")
        dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except (OverflowError, OSError):
        dt = None
    if dt is not None:
        dt = dt.replace(microsecond=dt.microsecond // 1000 * 1000)
    if dt is None or not TIME_MIN <= dt <= TIME_MAX:
        raise ValueError(f"time out of range: times lie in {TIME_RANGE}")
    return dt


def to_ms(dt: datetime) -> int:
    """Epoch milliseconds, truncated (never rounded across a second, minute or year boundary)."""
    return (dt - EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def entity_key(dtype: str, value: Any) -> str:
    """The canonical key of an entity id: an int64 in decimal, or a bounded non-empty string."""
    value = plain(value)
    if dtype == "int":
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"expected int, got {type_name(value)}")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected int, got a fraction")
        try:
            as_int = int(value)
        except (ValueError, OverflowError):
            raise ValueError(f"expected int, got {str(value)[:40]!r}") from None
        return str(check_int(as_int))
    if isinstance(value, str) and value:
        return check_text(value, MAX_KEY_CHARS)
    raise ValueError(f"expected a non-empty string, got {type_name(value)}")
