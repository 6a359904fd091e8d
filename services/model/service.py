"""The model server's core (MLServer's DataPlane idea): repository state and v2 inference.

Framework-free: routes parse and answer, this class does the work.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from services.chassis.telemetry import annotate

from . import metrics, repository
from .batching import Batcher, BatcherClosed, QueueFull
from .metrics import PrometheusObserver
from .repository import Baseline, Manifest, TensorSpec
from .runtimes import Runtime, RuntimeOptions, load_runtime

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
    batcher: Batcher | None = None
    baseline: Baseline | None = None  # training range per input feature: OOD flags per row

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.batcher is not None

    @property
    def device(self) -> str | None:
        return self.runtime.device if self.runtime else None


_version_key = repository.version_key


class DataPlane:
    def __init__(self, root: Path, options: RuntimeOptions | None = None, *, dynamic_batching: bool = True,
                 max_queue_size: int = 256):
        self.root = root
        self.options = options or RuntimeOptions()
        self.dynamic_batching = dynamic_batching
        self.max_queue_size = max_queue_size
        self.models: dict[str, dict[str, ModelVersion]] = {}
        # Versions on disk that the model's policy leaves out: model -> version -> why.
        self.unserved: dict[str, dict[str, str]] = {}
        # One repository change (load, unload, upload) at a time.
        self.repository_lock = asyncio.Lock()

    # -- repository -------------------------------------------------------------------------
    def load_all(self) -> None:
        for name, versions in repository.scan(self.root).items():
            try:
                policy = repository.read_policy(self.root / name)
            except repository.PolicyError as exc:
                # A broken policy is a broken model: visible as not ready, never a guess.
                for version, path in versions.items():
                    mv = ModelVersion(name, version, path, error=f"PolicyError: {exc}")
                    self.models.setdefault(name, {})[version] = mv
                log.error("model refused", extra={"model": name, "reason": str(exc)})
                continue
            served = repository.select_versions(policy, list(versions))
            for version in sorted(versions, key=_version_key):
                if version in served:
                    self.models.setdefault(name, {})[version] = self._load(name, version, versions[version])
                else:
                    self.unserved.setdefault(name, {})[version] = f"not selected by version policy {policy}"
                    log.info("model version not served", extra={"model": name, "version": version,
                                                                "policy": policy})

    def _load(self, name: str, version: str, path: Path) -> ModelVersion:
        mv = ModelVersion(name, version, path)
        try:
            mv.manifest = repository.read_manifest(path)
            mv.runtime = load_runtime(path, mv.manifest, self.options)
            m = mv.manifest
            mv.baseline = repository.read_baseline(path, [t.name for t in m.inputs if len(t.shape) == 1
                                                          and t.datatype not in ("BYTES", "BOOL")])
            mv.batcher = Batcher(
                mv.runtime.predict, name=f"{name}-{version}", max_batch_size=m.max_batch_size,
                max_queue_delay_s=m.max_queue_delay_ms / 1000.0, max_queue_size=self.max_queue_size,
                batching=self.dynamic_batching, observer=PrometheusObserver(name, version, mv.runtime.device))
            metrics.INFO.labels(name, version, m.runtime, mv.runtime.device, mv.runtime.precision).set(1)
            log.info("loaded model", extra={"model": name, "version": version, "runtime": m.runtime,
                                            "device": mv.runtime.device, "precision": mv.runtime.precision})
        except Exception as exc:  # a broken version must not take the server down
            mv.runtime = None
            mv.error = f"{type(exc).__name__}: {exc}"
            log.error("model version refused", extra={"model": name, "version": version, "reason": mv.error})
        return mv

    # -- repository extension (Triton's: index, load, unload) ----------------------------------
    def rescan(self, name: str) -> list[ModelVersion]:
        """Serve what the repository now holds for `name` under its policy (load = Triton's load):
        new versions load, loaded ones stay as they are, versions no longer selected leave. Returns
        the versions that left, whose batchers the caller closes (async)."""
        _check_names(name, None)
        found = repository.scan(self.root).get(name, {})
        if not found:
            raise V2Error(404, f"model '{name}' is not in the repository")
        current = self.models.get(name, {})
        try:
            served = repository.select_versions(repository.read_policy(self.root / name), list(found))
            unserved = {v: "not selected by version policy" for v in found if v not in served}
        except repository.PolicyError as exc:
            served, unserved = [], {v: f"PolicyError: {exc}" for v in found}
        versions: dict[str, ModelVersion] = {}
        for version in sorted(served, key=_version_key):
            mv = current.get(version)
            versions[version] = mv if mv is not None and mv.ready else self._load(name, version, found[version])
        gone = [mv for v, mv in current.items() if versions.get(v) is not mv]
        self.models[name] = versions
        if unserved:
            self.unserved[name] = unserved
        else:
            self.unserved.pop(name, None)
        return gone

    def baseline(self, name: str, version: str) -> dict:
        """The version's training baseline (client.baseline_edges' format), for drift checks by
        others: they ask the server, which owns the files, instead of reading its repository."""
        mv = self.resolve(name, version)
        path = mv.path / repository.BASELINE
        try:
            edges = json.loads(path.read_text())
        except FileNotFoundError:
            raise V2Error(404, f"model '{name}' version '{mv.version}' has no baseline") from None
        except ValueError:
            raise V2Error(503, f"model '{name}' version '{mv.version}' has an unreadable baseline") from None
        return {"name": name, "version": mv.version, "edges": edges}

    def changed(self) -> list[str]:
        """Models whose versions on disk differ from what this server knows (another replica took an
        upload into the shared repository): the poll loop rescans them, as Triton's poll mode does.
        An unloaded model stays unloaded until a load names it."""
        on_disk = repository.scan(self.root)
        out = []
        for name in sorted(set(on_disk) | set(self.models)):
            known = set(self.models.get(name, {})) | set(self.unserved.get(name, {}))
            unloaded = name not in self.models and any(
                why == "unloaded" for why in self.unserved.get(name, {}).values())
            if not unloaded and set(on_disk.get(name, {})) != known and name in on_disk:
                out.append(name)
        return out

    def unload(self, name: str) -> list[ModelVersion]:
        """Stop serving every version of `name` until the next load; returns them for closing."""
        _check_names(name, None)
        if name not in self.models:
            raise V2Error(404, f"model '{name}' is not loaded")
        gone = list(self.models.pop(name).values())
        self.unserved[name] = {mv.version: "unloaded" for mv in gone}
        return gone

    def add_version(self, name: str, config: dict, files: dict[str, bytes]) -> str:
        """Write a new version from an upload: the manifest (`config`) and every artifact it lists,
        hashed here (the server owns its files), to a temporary folder renamed into place. The
        version is the config's, else the next number; an existing version is never replaced."""
        _check_names(name, None)
        config = {**config, "name": name}
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        existing = repository.scan(self.root).get(name, {})
        version = str(config.get("version") or max((int(v) for v in existing if v.isdigit()), default=0) + 1)
        _check_names(name, version)
        if version in existing or (model_dir / version).exists():
            raise V2Error(409, f"model '{name}' already has a version '{version}'")
        try:
            manifest = Manifest.from_dict({**config, "version": version, "artifacts": config.get("artifacts") or {}})
        except (KeyError, TypeError, ValueError) as exc:
            raise V2Error(400, f"config is not a valid manifest: {type(exc).__name__}: {exc}") from None
        listed = set(manifest.artifacts)
        if not listed:
            raise V2Error(400, "a new version needs its artifacts: the config lists none")
        if listed != set(files):
            raise V2Error(400, f"files must be exactly the config's artifacts: listed {sorted(listed)}, "
                               f"sent {sorted(files)}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=model_dir))
        try:
            for artifact, content in files.items():
                path = (tmp / artifact).resolve()
                if path.parent != tmp.resolve() or not repository.is_valid_name(artifact):
                    raise V2Error(400, f"artifact name {artifact[:80]!r} is not a plain file name")
                path.write_bytes(content)
            repository.write_manifest(tmp, manifest)
            tmp.rename(model_dir / version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("model version added", extra={"model": name, "version": version})
        return version

    async def close(self) -> None:
        for vs in self.models.values():
            for mv in vs.values():
                if mv.batcher is not None:
                    await mv.batcher.close()

    @property
    def all_ready(self) -> bool:
        return bool(self.models) and all(v.ready for vs in self.models.values() for v in vs.values())

    def resolve(self, name: str, version: str | None = None) -> ModelVersion:
        _check_names(name, version)
        versions = self.models.get(name)
        if not versions:
            raise V2Error(404, f"model '{name}' not found")
        if version is None:
            ready = [v for v in versions.values() if v.ready] or list(versions.values())
            return max(ready, key=lambda mv: _version_key(mv.version))
        try:
            return versions[version]
        except KeyError:
            why = self.unserved.get(name, {}).get(version)
            if why:
                raise V2Error(404, f"model '{name}' version '{version}' is not served: {why}") from None
            raise V2Error(404, f"model '{name}' has no version '{version}'") from None

    def index(self) -> list[dict]:
        rows = [
            {"name": mv.name, "version": mv.version, "state": "READY" if mv.ready else "UNAVAILABLE",
             "reason": mv.error or ""}
            for vs in self.models.values() for mv in vs.values()
        ]
        rows += [{"name": n, "version": v, "state": "UNAVAILABLE", "reason": why}
                 for n, vs in self.unserved.items() for v, why in vs.items()]
        return sorted(rows, key=lambda r: (r["name"], _version_key(r["version"])))

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
            "parameters": {**m.parameters, "version": mv.version, "device": mv.device,
                           "precision": mv.runtime.precision if mv.runtime else None,
                           "runtime": m.runtime, "max_batch_size": m.max_batch_size,
                           "max_queue_delay_ms": m.max_queue_delay_ms,
                           "dynamic_batching": self.dynamic_batching, "digest": m.digest()},
        }

    def stats(self, name: str, version: str | None = None) -> list[dict]:
        """Batching statistics per served version (all versions when none is named)."""
        _check_names(name, version)
        if name not in self.models:
            raise V2Error(404, f"model '{name}' not found")
        mvs = [self.resolve(name, version)] if version else list(self.models[name].values())
        return [{"name": mv.name, "version": mv.version, "device": mv.device,
                 "queue_depth": mv.batcher.queue_depth if mv.batcher else 0,
                 **(mv.batcher.stats.as_dict() if mv.batcher else {})} for mv in mvs]

    # -- inference --------------------------------------------------------------------------
    async def infer(self, name: str, version: str | None, request: dict, timing: dict | None = None) -> dict:
        """One v2 request through the version's batcher; `timing` gets queue and model seconds."""
        mv = self.resolve(name, version)
        if not mv.ready:
            raise V2Error(503, f"model '{name}' version '{mv.version}' is not ready: {mv.error}")
        inputs = decode_inputs(request, mv.manifest.inputs)
        wanted = _requested_outputs(request, mv.manifest.outputs)
        binary = binary_outputs(request, mv.manifest.outputs)
        try:
            outputs, t = await mv.batcher.submit(inputs)
        except QueueFull as exc:
            raise V2Error(503, f"model '{name}' version '{mv.version}' is overloaded: {exc}") from None
        except BatcherClosed as exc:
            raise V2Error(503, str(exc)) from None
        except Exception as exc:
            log.exception("inference failed", extra={"model": name, "version": mv.version})
            raise V2Error(500, f"inference failed: {type(exc).__name__}: {exc}") from None
        if timing is not None:
            timing.update(queue=t.queue_s, model=t.compute_s, batch_rows=t.batch_rows)
        annotate(model=name, version=mv.version, device=mv.device, batch_size=t.batch_rows)
        response = {
            "model_name": name,
            "model_version": mv.version,
            "outputs": [encode_tensor(t, outputs[t.name], t.name in binary)
                        for t in mv.manifest.outputs if t.name in wanted],
        }
        if request.get("id") is not None:
            response["id"] = request["id"]
        if mv.baseline is not None:
            score, ood = mv.baseline.score(inputs)
            response["parameters"] = {"ood": ood.tolist(), "ood_score": score.round(6).tolist()}
            if ood.any():
                metrics.OOD_ROWS.labels(name, mv.version).inc(int(ood.sum()))
        return response


def _check_names(name: str, version: str | None) -> None:
    """Names never reach a lookup (or a log line) unless they have the repository's shape."""
    if not repository.is_valid_name(name):
        raise V2Error(400, f"invalid model name {name[:80]!r}: letters, digits, '_', '.', '-', at most 64")
    if version is not None and not repository.is_valid_name(version):
        raise V2Error(400, f"invalid model version {version[:80]!r}: letters, digits, '_', '.', '-', at most 64")


def _requested_outputs(request: dict, specs: list[TensorSpec]) -> set[str]:
    known = {t.name for t in specs}
    asked = request.get("outputs")
    if not asked:
        return known
    if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in asked):
        raise V2Error(400, "'outputs' must be a list of objects with a 'name'")
    if not all(isinstance(o.get("parameters", {}), dict) for o in asked):
        raise V2Error(400, "an output's 'parameters' must be a JSON object")
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
    if not isinstance(request.get("parameters", {}), dict):
        raise V2Error(400, "'parameters' must be a JSON object")
    raw = request.get("inputs")
    if not isinstance(raw, list) or not raw:
        raise V2Error(400, "'inputs' must be a non-empty list of tensors")
    by_name: dict[str, dict] = {}
    for t in raw:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise V2Error(400, "each input needs a string 'name'")
        if not isinstance(t.get("parameters", {}), dict):
            raise V2Error(400, f"input '{t['name']}': 'parameters' must be a JSON object")
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
    if batch == 0:
        raise V2Error(400, "the batch has no rows (first dimension 0)")
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
    if BINARY in t:
        return _decode_binary(name, spec.datatype, shape, t[BINARY])
    if not isinstance(data, list):
        raise V2Error(400, f"input '{name}' needs 'data' as a list")
    flat = _flatten(data)
    if len(flat) != math.prod(shape):
        raise V2Error(400, f"input '{name}' has {len(flat)} values, shape {shape} needs {math.prod(shape)}")
    if spec.datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise V2Error(400, f"input '{name}' of datatype BYTES needs string values")
        return np.array(flat, dtype=object).reshape(shape)
    if not all(isinstance(x, (int, float, bool)) and x is not None for x in flat):
        raise V2Error(400, f"input '{name}' of datatype {spec.datatype} needs numeric values")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # a float too large becomes inf: _finite says so
            return _finite(name, np.asarray(flat, dtype=DTYPES[spec.datatype]).reshape(shape))
    except (ValueError, OverflowError) as exc:
        raise V2Error(400, f"input '{name}': {exc}") from None


def _finite(name: str, arr: np.ndarray) -> np.ndarray:
    """Floating-point inputs must be finite: NaN or infinity (also a value too large for FP16/FP32,
    or NaN bytes in binary data) is the caller's 400, never a prediction."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise V2Error(400, f"input '{name}' has NaN or infinite values (or values out of {arr.dtype} range)")
    return arr


def encode_tensor(spec: TensorSpec, arr: np.ndarray, binary: bool = False) -> dict:
    arr = np.asarray(arr)
    if binary:
        raw = _encode_binary(spec.datatype, arr)
        return {"name": spec.name, "datatype": spec.datatype, "shape": list(arr.shape),
                "parameters": {"binary_data_size": len(raw)}, BINARY: raw}
    data = arr.reshape(-1).tolist()
    if spec.datatype == "BYTES":
        data = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in data]
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(arr.shape), "data": data}


# -- binary tensor data (Triton's extension; its clients send and ask for it by default) -------
BINARY = "_binary"  # internal key: raw bytes of a tensor, never serialised as JSON
HEADER_LENGTH = "Inference-Header-Content-Length"


def parse_infer_body(body: bytes, header_length: str | None = None) -> dict:
    """The JSON request, with each binary input's bytes attached (sizes from its parameters)."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise V2Error(400, f"{HEADER_LENGTH} must be an integer") from None
        if not 0 <= n <= len(body):
            raise V2Error(400, f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        body, binary = body[:n], body[n:]
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise V2Error(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        return request  # decode_inputs explains what is wrong
    offset = 0
    for t in request["inputs"]:
        params = t.get("parameters") if isinstance(t, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise V2Error(400, f"input '{t.get('name')}': binary_data_size {size!r} does not fit the body")
        t[BINARY] = binary[offset:offset + size]
        offset += size
    if offset != len(binary):
        raise V2Error(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return request


def binary_outputs(request: dict, specs: list[TensorSpec]) -> set[str]:
    """Outputs to return as raw bytes: asked per output, or for all by `binary_data_output`."""
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    asked = {o["name"]: o.get("parameters") or {} for o in request.get("outputs") or []}
    return {s.name for s in specs
            if bool(asked.get(s.name, {}).get("binary_data", default))}


def encode_infer_body(response: dict) -> tuple[bytes, int | None]:
    """JSON, or JSON header + binary outputs and the header's length for the HTTP header."""
    chunks = [o.pop(BINARY) for o in response["outputs"] if BINARY in o]
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def _decode_binary(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise V2Error(400, f"input '{name}': truncated BYTES element")
            n = int.from_bytes(raw[i:i + 4], "little")
            items.append(raw[i + 4:i + 4 + n].decode("utf-8", "replace"))
            i += 4 + n
        if len(items) != count or i != len(raw):
            raise V2Error(400, f"input '{name}' has {len(items)} BYTES elements, shape {shape} needs {count}")
        return np.array(items, dtype=object).reshape(shape)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise V2Error(400, f"input '{name}' has {len(raw)} bytes, shape {shape} of {datatype} needs "
                           f"{count * dtype.itemsize}")
    return _finite(name, np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(shape))


def _encode_binary(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for x in arr.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode("utf-8")
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()
