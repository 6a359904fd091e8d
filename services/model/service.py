"""The model server's core (MLServer's DataPlane idea): repository state and v2 inference.

Framework-free: routes parse and answer, this class does the work.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import repository
from .repository import Manifest, TensorSpec
from .runtimes import Runtime, load_runtime

log = logging.getLogger("aistack.model")

# Open Inference Protocol v2 datatypes -> numpy.
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


class V2Error(Exception):
    """Answered with the protocol's own body {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ModelVersion:
    name: str
    version: str
    path: Path
    manifest: Manifest | None = None
    runtime: Runtime | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.runtime is not None


def _version_key(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


class DataPlane:
    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, dict[str, ModelVersion]] = {}

    # -- repository -------------------------------------------------------------------------
    def load_all(self) -> None:
        for name, versions in repository.scan(self.root).items():
            for version, path in versions.items():
                self.models.setdefault(name, {})[version] = self._load(name, version, path)

    def _load(self, name: str, version: str, path: Path) -> ModelVersion:
        mv = ModelVersion(name, version, path)
        try:
            mv.manifest = repository.read_manifest(path)
            mv.runtime = load_runtime(path, mv.manifest)
            log.info("loaded model", extra={"model": name, "version": version,
                                            "runtime": mv.manifest.runtime, "device": mv.runtime.device})
        except Exception as exc:  # a broken version must not take the server down
            mv.error = f"{type(exc).__name__}: {exc}"
            log.error("model version refused", extra={"model": name, "version": version, "reason": mv.error})
        return mv

    @property
    def all_ready(self) -> bool:
        return bool(self.models) and all(v.ready for vs in self.models.values() for v in vs.values())

    def resolve(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            raise V2Error(404, f"model '{name}' not found")
        if version is None:
            ready = [v for v in versions.values() if v.ready] or list(versions.values())
            return max(ready, key=lambda mv: _version_key(mv.version))
        try:
            return versions[version]
        except KeyError:
            raise V2Error(404, f"model '{name}' has no version '{version}'") from None

    def index(self) -> list[dict]:
        return [
            {"name": mv.name, "version": mv.version, "state": "READY" if mv.ready else "UNAVAILABLE",
             "reason": mv.error or ""}
            for vs in self.models.values() for mv in vs.values()
        ]

    def metadata(self, name: str, version: str | None = None) -> dict:
        mv = self.resolve(name, version)
        if mv.manifest is None:
            raise V2Error(503, f"model '{name}' version '{mv.version}' is not available: {mv.error}")
        m = mv.manifest
        return {
            "name": name,
            "versions": sorted(self.models[name], key=_version_key),
            "platform": m.runtime,
            "inputs": [t.as_dict() for t in m.inputs],
            "outputs": [t.as_dict() for t in m.outputs],
            "parameters": {**m.parameters, "version": mv.version, "device": mv.runtime.device if mv.runtime else None,
                           "max_batch_size": m.max_batch_size},
        }

    # -- inference --------------------------------------------------------------------------
    async def infer(self, name: str, version: str | None, request: dict) -> dict:
        mv = self.resolve(name, version)
        if not mv.ready:
            raise V2Error(503, f"model '{name}' version '{mv.version}' is not ready: {mv.error}")
        inputs = decode_inputs(request, mv.manifest.inputs)
        outputs = await asyncio.to_thread(mv.runtime.predict, inputs)
        wanted = _requested_outputs(request, mv.manifest.outputs)
        response = {
            "model_name": name,
            "model_version": mv.version,
            "outputs": [encode_tensor(t, outputs[t.name]) for t in mv.manifest.outputs if t.name in wanted],
        }
        if request.get("id") is not None:
            response["id"] = request["id"]
        return response


def _requested_outputs(request: dict, specs: list[TensorSpec]) -> set[str]:
    known = {t.name for t in specs}
    asked = request.get("outputs")
    if not asked:
        return known
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise V2Error(400, "'outputs' must be a list of objects with a 'name'")
    names = {o["name"] for o in asked}
    unknown = names - known
    if unknown:
        raise V2Error(400, f"unknown output(s) {sorted(unknown)}; model has {sorted(known)}")
    return names


def _flatten(data: Any) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for row in data for x in _flatten(row)]
    return data


def decode_inputs(request: Any, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Validate a v2 request against the manifest and turn each input into an array."""
    if not isinstance(request, dict):
        raise V2Error(400, "request body must be a JSON object")
    raw = request.get("inputs")
    if not isinstance(raw, list) or not raw:
        raise V2Error(400, "'inputs' must be a non-empty list of tensors")
    by_name: dict[str, dict] = {}
    for t in raw:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise V2Error(400, "each input needs a string 'name'")
        by_name[t["name"]] = t
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(by_name))
    extra = sorted(set(by_name) - set(expected))
    if missing or extra:
        raise V2Error(400, f"inputs do not match the model: missing {missing}, unexpected {extra}")
    arrays: dict[str, np.ndarray] = {}
    batch = None
    for name, spec in expected.items():
        t = by_name[name]
        arr = decode_tensor(t, spec)
        if batch is not None and arr.shape[0] != batch:
            raise V2Error(400, f"input '{name}' has batch size {arr.shape[0]}, others have {batch}")
        batch = arr.shape[0]
        arrays[name] = arr
    return arrays


def decode_tensor(t: dict, spec: TensorSpec) -> np.ndarray:
    name = spec.name
    datatype, shape, data = t.get("datatype"), t.get("shape"), t.get("data")
    if datatype != spec.datatype:
        raise V2Error(400, f"input '{name}' has datatype {datatype!r}, expected {spec.datatype!r}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise V2Error(400, f"input '{name}' needs 'shape' as a non-empty list of non-negative integers")
    if len(shape) != len(spec.shape) or any(e != -1 and e != d for e, d in zip(spec.shape, shape)):
        raise V2Error(400, f"input '{name}' has shape {shape}, expected {spec.shape} (-1 = any)")
    if not isinstance(data, list):
        raise V2Error(400, f"input '{name}' needs 'data' as a list")
    flat = _flatten(data)
    if len(flat) != int(np.prod(shape)):
        raise V2Error(400, f"input '{name}' has {len(flat)} values, shape {shape} needs {int(np.prod(shape))}")
    if spec.datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise V2Error(400, f"input '{name}' of datatype BYTES needs string values")
        return np.array(flat, dtype=object).reshape(shape)
    if not all(isinstance(x, (int, float, bool)) and x is not None for x in flat):
        raise V2Error(400, f"input '{name}' of datatype {spec.datatype} needs numeric values")
    try:
        return np.asarray(flat, dtype=DTYPES[spec.datatype]).reshape(shape)
    except (ValueError, OverflowError) as exc:
        raise V2Error(400, f"input '{name}': {exc}") from None


def encode_tensor(spec: TensorSpec, arr: np.ndarray) -> dict:
    arr = np.asarray(arr)
    data = arr.reshape(-1).tolist()
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(arr.shape), "data": data}
