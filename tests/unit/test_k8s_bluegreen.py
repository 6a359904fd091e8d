"""Blue/green in k8s/: one model Deployment in the base, rendered per slot by kustomize."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def test_the_model_deployment_is_written_once():
    model_deployments = [(p.relative_to(ROOT), d["metadata"]["name"]) for p in sorted((ROOT / "k8s").rglob("*.yaml"))
                         if p.name != "kustomization.yaml" for d in _docs(p)
                         if d.get("kind") == "Deployment" and d["metadata"]["name"].startswith("model")]
    assert model_deployments == [(Path("k8s/base/model-deployment/deployment.yaml"), "model")]


def test_each_slot_is_a_kustomization_of_that_deployment():
    for slot, replicas in (("blue", 1), ("green", 0)):
        spec = yaml.safe_load((ROOT / "k8s/base/model-slots" / slot / "kustomization.yaml").read_text())
        assert spec["resources"] == ["../../model-deployment"] and spec["nameSuffix"] == f"-{slot}"
        assert spec["labels"] == [{"pairs": {"aistack.io/slot": slot}, "includeSelectors": True,
                                   "includeTemplates": True}]
        assert spec["replicas"] == [{"name": "model", "count": replicas}]
    base = yaml.safe_load((ROOT / "k8s/base/kustomization.yaml").read_text())
    assert {"model-slots/blue", "model-slots/green", "model.yaml"} <= set(base["resources"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders kustomizations")
def test_the_base_renders_two_slots_that_differ_only_in_slot_and_replicas(tmp_path):
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s/base")], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    slots = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out)
             if d and d["kind"] == "Deployment" and d["metadata"]["name"].startswith("model")}
    assert sorted(slots) == ["model-blue", "model-green"]
    blue, green = slots["model-blue"], slots["model-green"]
    assert (blue["spec"]["replicas"], green["spec"]["replicas"]) == (1, 0)
    assert green["spec"]["selector"]["matchLabels"]["aistack.io/slot"] == "green"
    assert green["spec"]["template"]["metadata"]["labels"]["aistack.io/slot"] == "green"
    text = yaml.safe_dump(green).replace("green", "blue").replace("replicas: 0", "replicas: 1")
    assert yaml.safe_load(text) == blue
