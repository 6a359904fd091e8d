"""`aistack models build` is reproducible: same seed, same bytes, same hashes."""
from __future__ import annotations

import json

from services.model.build import build


def test_fraud_build_is_reproducible(tmp_path):
    build(tmp_path / "a", only=["fraud"])
    build(tmp_path / "b", only=["fraud"])
    for version in ("1", "2"):
        a = json.loads((tmp_path / "a" / "fraud" / version / "manifest.json").read_text())
        b = json.loads((tmp_path / "b" / "fraud" / version / "manifest.json").read_text())
        assert a["artifacts"] == b["artifacts"]
        assert a["parameters"]["holdout_auc"] > 0.6


def test_build_skips_existing_versions(tmp_path):
    assert build(tmp_path, only=["fraud"]) == ["fraud/1", "fraud/2"]
    assert build(tmp_path, only=["fraud"]) == []
