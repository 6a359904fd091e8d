"""Versioned model repository on disk: <repo>/<model>/<version>/manifest.json plus artifacts.

The manifest records the sha256 of every artifact; a mismatch means the version is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import BASELINE, NAME_PATTERN, baseline_edges, is_valid_name

__all__ = ["NAME_PATTERN", "is_valid_name"]  # re-exported: the rules live in the contract (client.py)

log = logging.getLogger("aistack.model.repository")

MANIFEST = "manifest.json"

@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class Manifest:
    name: str
    version: str
    runtime: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    artifacts: dict[str, str]  # file name -> sha256
    max_batch_size: int = 64
    max_queue_delay_ms: float = 2.0
    device: str = "auto"
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        return cls(
            name=d["name"], version=str(d["version"]), runtime=d["runtime"],
            inputs=[TensorSpec(**t) for t in d["inputs"]],
            outputs=[TensorSpec(**t) for t in d["outputs"]],
            artifacts=dict(d["artifacts"]), max_batch_size=int(d.get("max_batch_size", 64)),
            max_queue_delay_ms=float(d.get("max_queue_delay_ms", 2.0)),
            device=d.get("device", "auto"), parameters=dict(d.get("parameters", {})),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name, "version": self.version, "runtime": self.runtime,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "artifacts": self.artifacts, "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms, "device": self.device,
            "parameters": self.parameters,
        }

    def digest(self) -> str:
        """sha256 of the canonical manifest (it holds every artifact's sha256): names the version's
        content, so a version re-registered with other weights gets another digest (cache keys)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_baseline(version_dir: Path, x, features: list[str]) -> None:
    """The training distribution per feature (client.baseline_edges), for drift checks on live inputs."""
    edges = baseline_edges({f: x[:, i].tolist() for i, f in enumerate(features)})
    (version_dir / BASELINE).write_text(json.dumps(edges, indent=2))


class Baseline:
    """The training range per input feature, for an out-of-distribution score per request row.

    From `baseline.json` (write_baseline): per feature 11 quantile edges q0, q10, ..., q100 of the
    training data, so q0 and q100 are the smallest and largest value training saw. Per row and
    feature the distance outside [q0, q100] is measured in units of that range (q100 - q0; 1 when
    the feature was constant):

        d_f = max(0, q0 - x, x - q100) / (q100 - q0)

    A row's `ood_score` is the largest d_f over its features (0: every value was within what
    training saw; 0.5: some feature lies half a training range beyond an edge), and `ood` is
    `ood_score > 0`: at least one feature outside the training range, a prediction the model
    extrapolates. NaN never reaches this (the server refuses non-finite inputs).
    """

    def __init__(self, features: list[str], lo, hi):
        import numpy as np

        self.features = features
        self.lo, self.hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        span = self.hi - self.lo
        self.scale = np.where(span > 0, span, 1.0)

    @classmethod
    def from_edges(cls, edges: dict, inputs: list[str]) -> Baseline | None:
        """The features of `edges` that are model inputs; None when none are."""
        names = [f for f in inputs if isinstance(edges.get(f), list) and len(edges[f]) >= 2
                 and all(isinstance(v, (int, float)) for v in edges[f])]
        if not names:
            return None
        return cls(names, [min(edges[f]) for f in names], [max(edges[f]) for f in names])

    def score(self, inputs: dict) -> tuple:
        """(ood_score, ood) per row, as float64 and bool arrays, from 1-D input tensors by name."""
        import numpy as np

        x = np.column_stack([np.asarray(inputs[f], dtype=np.float64).reshape(-1) for f in self.features])
        beyond = np.maximum(np.maximum(self.lo - x, x - self.hi), 0.0) / self.scale
        score = beyond.max(axis=1)
        return score, score > 0


def read_baseline(version_dir: Path, inputs: list[str]) -> Baseline | None:
    """The version's baseline over its input features, or None when it has none (or a broken one)."""
    path = version_dir / BASELINE
    if not path.is_file():
        return None
    try:
        edges = json.loads(path.read_text())
        return Baseline.from_edges(edges, inputs) if isinstance(edges, dict) else None
    except ValueError as exc:
        log.warning("baseline not readable, no OOD flags", extra={"path": str(path), "reason": str(exc)})
        return None


def write_manifest(version_dir: Path, manifest: Manifest) -> None:
    """Hash every artifact now, so the server can refuse a file changed after the build."""
    manifest.artifacts = {name: sha256_file(version_dir / name) for name in sorted(manifest.artifacts)}
    (version_dir / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))


class IntegrityError(Exception):
    pass


def read_manifest(version_dir: Path) -> Manifest:
    manifest = Manifest.from_dict(json.loads((version_dir / MANIFEST).read_text()))
    for name, expected in manifest.artifacts.items():
        path = version_dir / name
        if not path.is_file():
            raise IntegrityError(f"artifact {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(f"artifact {name} has sha256 {actual[:12]}…, manifest says {expected[:12]}…")
    return manifest


def scan(root: Path) -> dict[str, dict[str, Path]]:
    """Map model -> version -> directory for every folder that holds a manifest."""
    found: dict[str, dict[str, Path]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if not is_valid_name(model_dir.name):
            log.warning("skipping a model folder whose name is not a valid model name",
                        extra={"folder": model_dir.name[:100]})
            continue
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if not is_valid_name(version_dir.name):
                continue
            if (version_dir / MANIFEST).is_file():
                found.setdefault(model_dir.name, {})[version_dir.name] = version_dir
    return found


POLICY = "policy.json"


class PolicyError(Exception):
    pass


def version_key(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def read_policy(model_dir: Path) -> dict:
    """`policy.json` next to the versions: {"latest": N}, {"versions": [...]} or {"all": true}."""
    path = model_dir / POLICY
    if not path.is_file():
        return {"all": True}
    try:
        policy = json.loads(path.read_text())
    except ValueError as exc:
        raise PolicyError(f"{POLICY} is not valid JSON: {exc}") from None
    if not isinstance(policy, dict) or len(policy) != 1:
        raise PolicyError(f'{POLICY} needs exactly one of "latest", "versions", "all"')
    if "latest" in policy:
        n = policy["latest"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PolicyError(f'{POLICY}: "latest" must be a positive integer')
        return {"latest": n}
    if "versions" in policy:
        vs = policy["versions"]
        if not isinstance(vs, list) or not vs or not all(isinstance(v, (int, str)) for v in vs):
            raise PolicyError(f'{POLICY}: "versions" must be a non-empty list of versions')
        return {"versions": [str(v) for v in vs]}
    if policy.get("all") is True:
        return {"all": True}
    raise PolicyError(f'{POLICY} needs exactly one of "latest", "versions", "all"')


def select_versions(policy: dict, versions: list[str]) -> list[str]:
    """Which of the versions on disk are served, as Triton's version_policy does."""
    ordered = sorted(versions, key=version_key)
    if "latest" in policy:
        return ordered[-policy["latest"]:]
    if "versions" in policy:
        missing = sorted(set(policy["versions"]) - set(versions))
        if missing:
            log.warning("version policy lists versions that are not in the repository",
                        extra={"missing": missing})
        return [v for v in ordered if v in policy["versions"]]
    return ordered
