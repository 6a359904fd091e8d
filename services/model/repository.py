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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_baseline(version_dir: Path, x, features: list[str]) -> None:
    """The training distribution per feature (11 quantile edges), for drift checks on live inputs."""
    import numpy as np

    edges = {f: np.quantile(x[:, i], np.linspace(0, 1, 11)).round(6).tolist() for i, f in enumerate(features)}
    (version_dir / "baseline.json").write_text(json.dumps(edges, indent=2))


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
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
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
