"""Repository rules: tampered artifacts are refused, version policies choose what is served."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from services.model.repository import PolicyError, read_policy, select_versions
from services.model.service import DataPlane, V2Error


@pytest.fixture
def repo(models_dir, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(models_dir / "fraud", root / "fraud")
    return root


def test_tampered_artifact_is_refused_with_its_reason(repo, caplog):
    with (repo / "fraud" / "2" / "baseline.json").open("a") as f:
        f.write(" ")
    plane = DataPlane(repo)
    with caplog.at_level(logging.ERROR, logger="aistack.model"):
        plane.load_all()
    assert plane.resolve("fraud", "1").ready
    bad = plane.resolve("fraud", "2")
    assert not bad.ready and "baseline.json" in bad.error and "sha256" in bad.error
    assert not plane.all_ready
    assert {r["version"]: r["state"] for r in plane.index()} == {"1": "READY", "2": "UNAVAILABLE"}
    assert any(getattr(r, "reason", "") == bad.error for r in caplog.records)
    # Unversioned requests go to the newest version that is ready.
    assert plane.resolve("fraud").version == "1"


def test_missing_artifact_is_refused(repo):
    (repo / "fraud" / "1" / "model.joblib").unlink()
    plane = DataPlane(repo)
    plane.load_all()
    assert "missing" in plane.resolve("fraud", "1").error


@pytest.mark.parametrize("policy, served", [
    (None, ["1", "2"]), ({"latest": 1}, ["2"]), ({"latest": 5}, ["1", "2"]),
    ({"versions": [1]}, ["1"]), ({"all": True}, ["1", "2"]),
])
def test_version_policy_selects_served_versions(repo, policy, served):
    if policy is not None:
        (repo / "fraud" / "policy.json").write_text(json.dumps(policy))
    plane = DataPlane(repo)
    plane.load_all()
    assert sorted(plane.models["fraud"]) == served
    assert plane.all_ready and plane.metadata("fraud")["versions"] == served
    for version in {"1", "2"} - set(served):
        with pytest.raises(V2Error) as exc:
            plane.resolve("fraud", version)
        assert exc.value.status == 404 and "version policy" in exc.value.message
        assert any(r["version"] == version and r["state"] == "UNAVAILABLE" for r in plane.index())


@pytest.mark.parametrize("text", ['{"latest": 0}', '{"versions": []}', "{nope", '{"latest": 1, "versions": ["1"]}'])
def test_invalid_policy_makes_the_model_unavailable(repo, text):
    (repo / "fraud" / "policy.json").write_text(text)
    with pytest.raises(PolicyError):
        read_policy(repo / "fraud")
    plane = DataPlane(repo)
    plane.load_all()
    assert not plane.all_ready and all("PolicyError" in mv.error for mv in plane.models["fraud"].values())


def test_select_versions_orders_numerically():
    assert select_versions({"latest": 2}, ["9", "10", "2"]) == ["9", "10"]
