"""Feature store logic that needs no servers: typing, durations, feature selection, demo data."""
from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from services.chassis.errors import AppError
from services.demo.synthetic import CUSTOMER_FEATURES, customer_history, customer_profiles
from services.features.dtypes import check_value, parse_time
from services.features.registry import Registry, load_doc, select_features
from services.features.schemas import (
    Change,
    Entity,
    FeatureView,
    FeatureViewSpec,
    RegistryDoc,
    parse_duration,
)
from services.features.seed import DEFAULTS_FILE, demo_rows


def test_check_value_is_strict():
    assert check_value("float", 3) == 3.0 and isinstance(check_value("float", 3), float)
    assert check_value("int", 4.0) == 4
    assert check_value("string", "x") == "x"
    assert check_value("bool", True) is True
    assert check_value("float", None) is None
    for dtype, value in [("float", "3"), ("float", True), ("int", 3.5), ("int", "1"), ("string", 1),
                         ("bool", 1), ("float", float("inf"))]:
        with pytest.raises(ValueError):
            check_value(dtype, value)


def test_parse_time_and_duration():
    assert parse_time("2025-01-01T00:00:00Z") == datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_time(datetime(2025, 1, 1)) == datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_time(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert [parse_duration(v) for v in (60, "90s", "30m", "24h", "7d", "2w")] == \
        [60, 90, 1800, 86400, 604800, 1209600]
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_view_spec_ttl_alias_and_unique_features():
    spec = FeatureViewSpec.model_validate({"name": "v", "entity": "e", "ttl": "1h",
                                           "features": [{"name": "a"}]})
    assert spec.ttl_seconds == 3600
    with pytest.raises(ValidationError):
        FeatureViewSpec.model_validate({"name": "v", "entity": "e", "features": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValidationError):
        FeatureViewSpec.model_validate({"name": "v", "entity": "e", "features": [{"name": "event_time"}]})


def _registry() -> Registry:
    reg = Registry()
    reg.entities["customer"] = Entity(name="customer", join_key="customer_id", version=1)
    reg.entities["merchant"] = Entity(name="merchant", join_key="merchant_id", version=1)
    reg.views["a"] = FeatureView(name="a", entity="customer", version=1, features=[{"name": "x"}, {"name": "y"}])
    reg.views["b"] = FeatureView(name="b", entity="customer", version=1, features=[{"name": "x"}])
    reg.views["m"] = FeatureView(name="m", entity="merchant", version=1, features=[{"name": "z"}])
    return reg


def test_select_features():
    reg = _registry()
    sel = select_features(reg, "customer", ["a"], False)
    assert [n for n, _, _ in sel.names] == ["x", "y"]
    sel = select_features(reg, "customer", ["a:y", "b:x"], False)
    assert [n for n, _, _ in sel.names] == ["y", "x"] and [v.name for v in sel.views] == ["a", "b"]
    with pytest.raises(AppError) as exc:
        select_features(reg, "customer", ["a:x", "b:x"], False)
    assert exc.value.code == "ambiguous_feature_names"
    sel = select_features(reg, "customer", ["a:x", "b:x"], True)
    assert [n for n, _, _ in sel.names] == ["a:x", "b:x"]
    for refs, code in [(["m:z"], "entity_mismatch"), (["a:nope"], "feature_not_found"), (["zz"], "view_not_found")]:
        with pytest.raises(AppError) as exc:
            select_features(reg, "customer", refs, False)
        assert exc.value.code == code


def test_defaults_match_the_fraud_model_inputs():
    doc = load_doc(DEFAULTS_FILE)
    assert isinstance(doc, RegistryDoc)
    (entity,) = doc.entities
    assert (entity.name, entity.join_key, entity.dtype) == ("customer", "customer_id", "string")
    view = next(v for v in doc.feature_views if v.name == "customer_transactions")
    assert view.entity == "customer" and [f.name for f in view.features] == CUSTOMER_FEATURES


def test_customer_history_ends_with_the_profiles():
    history = customer_history(20, snapshots=3)
    assert len(history) == 3
    base = customer_profiles(20)
    for f in CUSTOMER_FEATURES:
        np.testing.assert_array_equal(history[-1][f], base[f])
    rows = demo_rows(5, 2, datetime(2025, 1, 2, tzinfo=UTC))
    assert len(rows) == 10 and rows[0].entity_key == "C0001" and set(rows[0].values) == set(CUSTOMER_FEATURES)
    assert rows[-1].event_ms - rows[0].event_ms == 86_400_000


def test_change_formatting():
    from services.features.cli import format_change

    line = format_change(Change(kind="feature_view", name="v", action="updated", version=2,
                                diff={"ttl_seconds": [60, 120], "features": {"added": ["z"], "removed": [],
                                                                             "changed": []}}))
    assert line.startswith("~ feature_view v: updated (v2)") and "60 -> 120" in line and "added z" in line


def test_values_beyond_their_type_are_refused_naming_the_bound():
    from services.features.dtypes import INT_MAX, INT_MIN, MAX_STRING_CHARS, entity_key

    assert check_value("int", INT_MAX) == INT_MAX and check_value("int", INT_MIN) == INT_MIN
    for dtype, value, words in [("int", INT_MAX + 1, "64-bit"), ("int", INT_MIN - 1, "64-bit"),
                                ("int", 2.0**70, "64-bit"), ("float", 10**400, "double"),
                                ("string", "x" * (MAX_STRING_CHARS + 1), str(MAX_STRING_CHARS)),
                                ("string", "a\x00", "NUL"), ("string", "\ud800", "surrogate")]:
        with pytest.raises(ValueError, match=words):
            check_value(dtype, value)
    assert check_value("float", 10**300) == 1e300
    assert entity_key("int", "42") == "42" and entity_key("string", "C1") == "C1"
    for dtype, value in [("int", 2**63), ("int", "9" * 30), ("string", ""), ("string", "x" * 513),
                         ("string", "\x00")]:
        with pytest.raises(ValueError):
            entity_key(dtype, value)


def test_event_times_are_truncated_to_the_millisecond_and_bounded():
    from services.features.dtypes import TIME_MAX, from_ms, to_ms

    assert parse_time("9999-12-31T23:59:59.9999Z") == TIME_MAX
    assert parse_time("2025-12-31T23:59:59.9999Z") == datetime(2025, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert parse_time(1.9999) == datetime(1970, 1, 1, 0, 0, 1, 999000, tzinfo=UTC)
    assert from_ms(to_ms(TIME_MAX)) == TIME_MAX
    assert parse_time("0001-01-01T00:00:00.001Z") == datetime(1, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)
    for bad in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", 1e20,
                float("nan"), "10000-01-01"):
        with pytest.raises(ValueError, match="out of range|finite|Invalid|invalid|expected"):
            parse_time(bad)


def test_ttl_is_bounded():
    from services.features.dtypes import MAX_TTL_SECONDS

    for spec in ({"ttl_seconds": MAX_TTL_SECONDS + 1}, {"ttl": "99999999w"}, {"ttl": float("inf")}):
        with pytest.raises(ValidationError):
            FeatureViewSpec.model_validate({"name": "v", "entity": "e", "features": [{"name": "a"}], **spec})
    ok = FeatureViewSpec.model_validate({"name": "v", "entity": "e", "features": [{"name": "a"}],
                                         "ttl_seconds": MAX_TTL_SECONDS})
    assert ok.ttl_seconds == MAX_TTL_SECONDS
