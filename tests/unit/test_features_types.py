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
