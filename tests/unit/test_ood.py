"""Out-of-distribution flags: the training range from baseline.json, a score per row, in the v2
response and in aistack_model_ood_rows_total; the client carries `ood` into each row."""
from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.model.client import decode_rows, encode_rows
from services.model.repository import Baseline, read_baseline
from services.model.service import DataPlane


def test_score_is_the_largest_distance_outside_the_training_range_in_range_units():
    b = Baseline(["a", "b"], lo=[0.0, 10.0], hi=[10.0, 10.0])  # b was constant in training
    score, ood = b.score({"a": np.array([5.0, 15.0, -2.0, 10.0]), "b": np.array([10.0, 10.0, 10.0, 12.0])})
    assert score.tolist() == [0.0, 0.5, 0.2, 2.0]  # constant feature: distance in units of 1
    assert ood.tolist() == [False, True, True, True]


def test_baseline_uses_the_edges_of_model_inputs_only(tmp_path):
    (tmp_path / "baseline.json").write_text(json.dumps({"a": [1, 2, 3], "other": [0, 1], "bad": "x"}))
    b = read_baseline(tmp_path, ["a", "bad", "c"])
    assert b.features == ["a"] and b.lo.tolist() == [1.0] and b.hi.tolist() == [3.0]
    assert read_baseline(tmp_path, ["c"]) is None
    assert read_baseline(tmp_path / "none", ["a"]) is None
    (tmp_path / "baseline.json").write_text("{not json")
    assert read_baseline(tmp_path, ["a"]) is None


def test_decode_rows_adds_ood_per_row_when_the_server_sends_it():
    response = {"outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 1]}],
                "parameters": {"ood": [False, True], "ood_score": [0.0, 1.5]}}
    assert decode_rows(response) == [{"label": 0, "ood": False}, {"label": 1, "ood": True}]
    del response["parameters"]
    assert decode_rows(response) == [{"label": 0}, {"label": 1}]


@pytest.fixture
def plane(models_dir, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(models_dir / "fraud", root / "fraud")
    plane = DataPlane(root, dynamic_batching=False)
    plane.load_all()
    yield plane
    asyncio.run(plane.close())


def _counter(model: str, version: str) -> float:
    return REGISTRY.get_sample_value("aistack_model_ood_rows_total", {"model": model, "version": version}) or 0.0


def test_the_baseline_is_loaded_once_and_flags_rows_in_the_response_and_metrics(plane, models_dir):
    mv = plane.resolve("fraud", "2")
    assert mv.baseline is not None and set(mv.baseline.features) == {t.name for t in mv.manifest.inputs}
    edges = json.loads((models_dir / "fraud" / "2" / "baseline.json").read_text())
    typical = {f: e[5] for f, e in edges.items()}  # the training median of every feature
    extreme = {**typical, "amount": edges["amount"][-1] * 10}
    meta = plane.metadata("fraud", "2")
    before = _counter("fraud", "2")

    async def infer():
        async with asyncio.timeout(60):
            return await plane.infer("fraud", "2", encode_rows(meta, [typical, extreme, typical]))

    response = asyncio.run(infer())
    assert response["parameters"]["ood"] == [False, True, False]
    assert response["parameters"]["ood_score"][0] == 0 and response["parameters"]["ood_score"][1] == pytest.approx(9, rel=0.01)
    assert [r["ood"] for r in decode_rows(response)] == [False, True, False]
    assert _counter("fraud", "2") == before + 1
