"""Runtimes behind one small interface: load artifacts from a version dir, predict on arrays."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .repository import Manifest


class Runtime(Protocol):
    device: str

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs and outputs are keyed by tensor name; the first axis is the batch."""


class SklearnRuntime:
    """A fitted scikit-learn classifier; inputs are one 1-D tensor per feature, in manifest order."""

    device = "cpu"

    def __init__(self, version_dir: Path, manifest: Manifest):
        import joblib

        self.estimator = joblib.load(version_dir / "model.joblib")
        self.feature_order = [t.name for t in manifest.inputs]
        self.classes = np.asarray(self.estimator.classes_)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.column_stack([inputs[n].reshape(-1).astype(np.float32) for n in self.feature_order])
        proba = self.estimator.predict_proba(x).astype(np.float32)
        return {"label": self.classes[proba.argmax(axis=1)].astype(np.int64), "probability": proba}


RUNTIMES = {"sklearn": SklearnRuntime}


def load_runtime(version_dir: Path, manifest: Manifest) -> Runtime:
    try:
        cls = RUNTIMES[manifest.runtime]
    except KeyError:
        raise ValueError(f"unknown runtime {manifest.runtime!r}; known: {sorted(RUNTIMES)}") from None
    return cls(version_dir, manifest)
