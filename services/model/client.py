"""The model server's published contract: the only module of services.model that others import.

One v2 client (async for services, sync for Celery tasks) with one error mapping to AppError, one
encoder/decoder between rows or columns and v2 tensors, the typed feature binding a model declares
(entity, feature view, join key), the name rules, the baseline format, and the repository
extension (Triton's: index, load, unload; a load may carry the files of a new version).

Light on purpose: no numpy, pandas or torch (every image carries it); columns may be lists or
numpy arrays, the code only indexes and slices them.
"""
from __future__ import annotations

import array
import base64
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Self

import httpx
import orjson
from pydantic import AfterValidator, StringConstraints

from services.chassis.errors import AppError
from services.chassis.internal import internal_headers
from services.chassis.upstream import UpstreamError

__all__ = [
    "BASELINE",
    "NAME_PATTERN",
    "SERVER_PARAMETERS",
    "AsyncModelClient",
    "FeatureBinding",
    "InvalidName",
    "MissingInputs",
    "ModelClient",
    "ModelName",
    "ModelUnavailable",
    "baseline_edges",
    "check_name",
    "decode_columns",
    "decode_rows",
    "encode_binary",
    "encode_columns",
    "encode_rows",
    "error_from_response",
    "infer_path",
    "is_valid_name",
    "manifest_parameters",
    "metadata_path",
    "unreachable",
]

# -- names -----------------------------------------------------------------------------------------
# Model names and versions become directory names on the server, URL path segments and parts of
# Redis keys: one strict shape everywhere (no '/', no '..', no control or non-ASCII characters).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(value: Any) -> bool:
    return isinstance(value, str) and bool(_NAME.fullmatch(value)) and ".." not in value


def _no_dots(value: str) -> str:
    if ".." not in value:
        return value
    raise ValueError("must not contain '..'")


# For pydantic fields and FastAPI path parameters: 422 with the pattern in the OpenAPI document.
ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=64), AfterValidator(_no_dots)]


class InvalidName(AppError):
    def __init__(self, what: str, value: Any):
        shown = value[:80] if isinstance(value, str) else value
        super().__init__(422, f"invalid_{what}_name", f"{what} name {shown!r} is not valid: letters, digits, "
                         "'_', '.', '-', starting with a letter or digit, at most 64, no '..'",
                         {"pattern": NAME_PATTERN})


def check_name(value: Any, what: str = "model") -> str:
    """The name itself, or InvalidName (422): call before a name reaches a path, URL or key."""
    if not is_valid_name(value):
        raise InvalidName(what, value)
    return value


def metadata_path(model: str, version: str | None = None) -> str:
    check_name(model)
    if version is None:
        return f"/v2/models/{model}"
    return f"/v2/models/{model}/versions/{check_name(version, 'version')}"


def infer_path(model: str, version: str | None = None) -> str:
    return metadata_path(model, version) + "/infer"


# -- the feature binding ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureBinding:
    """Where a model's entity features come from: `view` of `entity` in the feature store, looked up
    by the row's `join_key`; `request_features` come with the request and never from the store."""

    entity: str
    view: str
    join_key: str
    request_features: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_metadata(cls, metadata: Mapping) -> FeatureBinding | None:
        """From a model's v2 metadata (its manifest parameters); None when it binds no features."""
        params = metadata.get("parameters") or {}
        return cls.from_parameters(params) if isinstance(params, Mapping) else None

    @classmethod
    def from_parameters(cls, params: Mapping) -> FeatureBinding | None:
        entity, view = params.get("entity"), params.get("feature_view")
        if not (isinstance(entity, str) and entity and isinstance(view, str) and view):
            return None
        join_key = params.get("join_key")
        request = params.get("request_features") or ()
        return cls(entity=entity, view=view,
                   join_key=join_key if isinstance(join_key, str) and join_key else f"{entity}_id",
                   request_features=tuple(str(f) for f in request if isinstance(f, str)))

    def as_parameters(self) -> dict:
        """The manifest parameters that declare this binding (what from_parameters reads)."""
        return {"entity": self.entity, "feature_view": self.view, "join_key": self.join_key,
                "request_features": list(self.request_features)}


# Keys the server adds to a version's manifest parameters in its v2 metadata (service.DataPlane.metadata).
SERVER_PARAMETERS = frozenset({"version", "device", "precision", "runtime", "max_batch_size",
                               "max_queue_delay_ms", "dynamic_batching", "digest"})


def manifest_parameters(metadata: Mapping) -> dict:
    """The manifest's own parameters of the version that `metadata` describes (what a new version
    built from it carries over), without what the server added."""
    return {k: v for k, v in (metadata.get("parameters") or {}).items() if k not in SERVER_PARAMETERS}


# -- encoder / decoder -----------------------------------------------------------------------------
class MissingInputs(AppError):
    def __init__(self, missing: list[str], rows: list[int]):
        super().__init__(422, "missing_features", f"missing input features: {', '.join(missing)}",
                         {"missing": missing, "rows": rows})


def _cast(datatype: str, value: Any) -> Any:
    if datatype.startswith("FP"):
        return float(value)
    if datatype.startswith(("INT", "UINT")):
        return int(value)
    if datatype == "BOOL":
        return bool(value)
    return str(value)


def encode_columns(metadata: Mapping, columns: Mapping[str, Sequence], rows: int,
                   request_id: str | None = None) -> dict:
    """A v2 infer request from typed columns (lists or numpy arrays, `rows` long), one tensor per
    model input, batch on axis 0. A column the model needs and `columns` lacks is MissingInputs."""
    missing = sorted(spec["name"] for spec in metadata["inputs"] if spec["name"] not in columns)
    if missing:
        raise MissingInputs(missing, [])
    inputs = [{"name": spec["name"], "datatype": spec["datatype"], "shape": [rows, *spec["shape"][1:]],
               "data": columns[spec["name"]]} for spec in metadata["inputs"]]
    body: dict = {"inputs": inputs}
    if request_id:
        body["id"] = request_id
    return body


def encode_rows(metadata: Mapping, rows: list[dict], request_id: str | None = None) -> dict:
    """A v2 infer request from rows of named features; a missing or mistyped feature is a 422."""
    missing: set[str] = set()
    bad_rows: set[int] = set()
    columns: dict[str, list] = {}
    for spec in metadata["inputs"]:
        name, datatype = spec["name"], spec["datatype"]
        column = columns[name] = []
        for i, row in enumerate(rows):
            if row.get(name) is None:
                missing.add(name)
                bad_rows.add(i)
                continue
            try:
                column.append(_cast(datatype, row[name]))
            except (TypeError, ValueError):
                raise AppError(422, "invalid_feature", f"feature '{name}' must be {datatype}, got {row[name]!r}",
                               {"feature": name, "row": i}) from None
    if missing:
        raise MissingInputs(sorted(missing), sorted(bad_rows))
    return encode_columns(metadata, columns, len(rows), request_id)


def _width(shape: Sequence[int]) -> int:
    width = 1
    for d in shape[1:]:
        width *= d
    return width


def decode_columns(response: Mapping) -> dict[str, Sequence]:
    """Output tensors as columns; a [n, k] output becomes columns name_0 .. name_{k-1}. Slices of
    the response's data (lists, or numpy arrays when the caller decoded binary tensors)."""
    cols: dict[str, Sequence] = {}
    for out in response["outputs"]:
        shape, data = out["shape"], out["data"]
        if len(shape) == 1:
            cols[out["name"]] = data
            continue
        width = _width(shape)
        for j in range(width):
            cols[f"{out['name']}_{j}"] = data[j::width]
    return cols


def decode_rows(response: Mapping) -> list[dict]:
    """Split batched output tensors back into one {output: value} dict per row (+ `ood` when sent)."""
    outputs = response["outputs"]
    n = outputs[0]["shape"][0] if outputs else 0
    rows: list[dict] = [{} for _ in range(n)]
    for out in outputs:
        shape, data = out["shape"], out["data"]
        width = _width(shape)
        for i in range(n):
            rows[i][out["name"]] = data[i] if len(shape) == 1 else list(data[i * width:(i + 1) * width])
    # The server's out-of-distribution flag per row (a version with a training baseline), additive.
    ood = (response.get("parameters") or {}).get("ood")
    if isinstance(ood, list) and len(ood) == n:
        for row, flag in zip(rows, ood):
            row["ood"] = bool(flag)
    return rows


# -- binary tensors (Triton's binary_tensor_data extension) -----------------------------------------
# A column of 10,000 floats is 40 KB of bytes instead of ~200 KB of JSON that both sides must
# format and parse: what batch jobs send. Little-endian, row-major, as the extension says.
HEADER_LENGTH = "Inference-Header-Content-Length"
_FORMAT = {"BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
           "INT32": "i", "INT64": "q", "FP32": "f", "FP64": "d"}
_KIND = {**dict.fromkeys("fde", "f"), **dict.fromkeys("bhilq", "i"), **dict.fromkeys("BHILQ", "u"), "?": "?"}


def _raw(data: Any, fmt: str) -> bytes:
    """The values' bytes: zero-copy from a buffer (a numpy array) of the same kind and width,
    else converted value by value."""
    try:
        view = memoryview(data)
    except TypeError:
        view = None
    if view is not None and sys.byteorder == "little":
        have = view.format.lstrip("@=<")
        if _KIND.get(have) == _KIND[fmt] and view.itemsize == array.array(fmt if fmt != "?" else "b").itemsize:
            return view.tobytes()
    if fmt == "?":
        return bytes(bool(x) for x in data)
    return array.array(fmt, data).tobytes()


def encode_binary(body: dict) -> tuple[bytes, int]:
    """A v2 request (as encode_columns builds it) as JSON header + binary tensors, asking for binary
    outputs too; the header's length goes in the Inference-Header-Content-Length header. Tensors of a
    type the extension has no fixed width for (BYTES, FP16) stay JSON."""
    inputs, chunks = [], []
    for t in body["inputs"]:
        fmt = _FORMAT.get(t["datatype"])
        if fmt is None:
            inputs.append(t)
            continue
        raw = _raw(t["data"], fmt)
        chunks.append(raw)
        inputs.append({k: v for k, v in t.items() if k != "data"} |
                      {"parameters": {**(t.get("parameters") or {}), "binary_data_size": len(raw)}})
    head = _dumps({**body, "inputs": inputs,
                   "parameters": {**(body.get("parameters") or {}), "binary_data_output": True}})
    return head + b"".join(chunks), len(head)


def _decode_binary_response(content: bytes, header_length: int) -> dict:
    """The response with each binary output's bytes as a typed view (`data`), zero-copy."""
    response = json.loads(content[:header_length])
    view, offset = memoryview(content), header_length
    for out in response.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        raw = view[offset:offset + size]
        offset += size
        if out["datatype"] == "BYTES":
            items, i = [], 0
            while i < len(raw):
                n = int.from_bytes(raw[i:i + 4], "little")
                items.append(bytes(raw[i + 4:i + 4 + n]).decode("utf-8", "replace"))
                i += 4 + n
            out["data"] = items
        else:
            out["data"] = raw.cast(_FORMAT[out["datatype"]])
    return response


def _response_body(response: httpx.Response) -> Any:
    length = response.headers.get(HEADER_LENGTH)
    return _decode_binary_response(response.content, int(length)) if length else response.json()


# -- the training baseline -------------------------------------------------------------------------
BASELINE = "baseline.json"
BASELINE_EDGES = 11


def baseline_edges(columns: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """`baseline.json` of a version: per input feature the 11 quantile edges q0, q10, ..., q100 of
    its training values (linear interpolation, rounded to 6 digits); the server flags rows outside
    [q0, q100] as out of distribution."""
    edges: dict[str, list[float]] = {}
    for name, values in columns.items():
        ordered = sorted(float(v) for v in values)
        if not ordered:
            continue
        last = len(ordered) - 1
        out = []
        for k in range(BASELINE_EDGES):
            pos = last * k / (BASELINE_EDGES - 1)
            lo = int(pos)
            hi = min(lo + 1, last)
            out.append(round(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo), 6))
        edges[name] = out
    return edges


# -- errors ----------------------------------------------------------------------------------------
class ModelUnavailable(UpstreamError):
    """The model server failed or could not be reached, not the caller's request: worth a retry (a
    Celery task retries; the orchestrator may fall back to another version)."""


def _message(content: bytes, fallback: str) -> str:
    try:
        body = json.loads(content)
    except ValueError:
        return content[:300].decode(errors="replace") or fallback
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):  # the stack's own error shape (repository endpoints' 403)
        err = err.get("message")
    return str(err or fallback)[:500]


def error_from_response(status: int, content: bytes, headers: Mapping[str, str] | None = None) -> AppError:
    """The one mapping of a model server error answer to AppError: the caller's fault stays a 4xx
    (404 unknown model or version, 413 too large, 422 for the rest), the server's is ModelUnavailable
    (503 with Retry-After for overload, 504, else 502)."""
    message = _message(content, f"model server answered {status}")
    retry_after = (headers or {}).get("retry-after") or (headers or {}).get("Retry-After") or "1"
    if status == 404:
        return AppError(404, "model_not_found", message)
    if status == 413:
        return AppError(413, "payload_too_large", message)
    if status in (401, 403):
        return ModelUnavailable(502, "model_forbidden", f"the model server refused this service: {message}")
    if 400 <= status < 500 and status != 429:
        return AppError(422, "invalid_inputs", message)
    if status in (429, 503):
        return ModelUnavailable(503, "model_unavailable", message, headers={"Retry-After": retry_after})
    if status == 504:
        return ModelUnavailable(504, "model_timeout", message)
    return ModelUnavailable(502, "model_error", message, headers={"Retry-After": retry_after})


def unreachable(exc: Exception) -> ModelUnavailable:
    return ModelUnavailable(503, "model_unreachable", f"model server unreachable: {type(exc).__name__}",
                            headers={"Retry-After": "1"})


# -- the clients -----------------------------------------------------------------------------------
_JSON = {"content-type": "application/json"}
Send = Callable[[str, str, bytes, dict, float | None], Awaitable[httpx.Response]]


def _dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _load_body(config: Mapping | None, files: Mapping[str, bytes] | None) -> dict:
    """Triton's load request: `config` (the version's manifest, JSON) and `file:<path>` contents."""
    params: dict[str, str] = {}
    if config is not None:
        params["config"] = json.dumps(config)
    for path, content in (files or {}).items():
        params[f"file:{path}"] = base64.b64encode(content).decode()
    return {"parameters": params} if params else {}


class _Base:
    def __init__(self, internal_token: str | None = None, metadata_ttl_s: float = 0.0):
        self.ttl = metadata_ttl_s
        self.headers = {**_JSON, **internal_headers(internal_token)}
        self._metadata: dict[tuple[str, str | None], tuple[float, dict]] = {}

    def _cached(self, model: str, version: str | None) -> dict | None:
        hit = self._metadata.get((model, version))
        return hit[1] if hit and time.monotonic() - hit[0] < self.ttl else None

    def _remember(self, model: str, version: str | None, meta: dict) -> dict:
        if self.ttl > 0:
            self._metadata[(model, version)] = (time.monotonic(), meta)
        return meta


def _content(body: Any, headers: dict, binary: bool) -> tuple[bytes, dict]:
    if body is None:
        return b"", headers
    if isinstance(body, bytes):
        return body, headers
    if binary:
        content, length = encode_binary(body)
        return content, {**headers, "content-type": "application/octet-stream", HEADER_LENGTH: str(length)}
    return _dumps(body), headers


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.content, response.headers)
    return response


class AsyncModelClient(_Base):
    """The model server for an async service. `send` is any (method, path, body, headers, timeout)
    -> httpx.Response: an httpx.AsyncClient (`over`) or a replica pool (`over_upstream`)."""

    def __init__(self, send: Send, *, internal_token: str | None = None, metadata_ttl_s: float = 0.0):
        super().__init__(internal_token, metadata_ttl_s)
        self._send = send

    @classmethod
    def over(cls, http: httpx.AsyncClient, **kw) -> AsyncModelClient:
        async def send(method, path, content, headers, timeout):
            extra = {"timeout": timeout} if timeout else {}
            return await http.request(method, path, content=content, headers=headers, **extra)
        return cls(send, **kw)

    @classmethod
    def over_upstream(cls, upstream, **kw) -> AsyncModelClient:
        """Over chassis.upstream's replica pool; inference has no side effects, so it is retried."""
        async def send(method, path, content, headers, timeout):
            return await upstream.forward(method, path, content, headers, timeout_s=timeout,
                                          idempotent="/repository/" not in path)
        return cls(send, **kw)

    async def _call(self, method: str, path: str, body: Any = None, timeout: float | None = None,
                    binary: bool = False) -> Any:
        content, headers = _content(body, self.headers, binary)
        try:
            response = await self._send(method, path, content, headers, timeout)
        except httpx.HTTPError as exc:
            raise unreachable(exc) from None
        return _response_body(_check(response))

    async def metadata(self, model: str, version: str | None = None) -> dict:
        path = metadata_path(model, version)
        return self._cached(model, version) or self._remember(model, version, await self._call("GET", path))

    async def infer(self, model: str, version: str | None, body: dict | bytes,
                    timeout: float | None = None, binary: bool = False) -> dict:
        """`binary`: send and receive tensors as bytes (encode_binary); outputs come back as views."""
        return await self._call("POST", infer_path(model, version), body, timeout, binary)

    async def infer_rows(self, model: str, rows: list[dict], version: str | None = None) -> list[dict]:
        meta = await self.metadata(model, version)
        return decode_rows(await self.infer(model, meta["parameters"]["version"], encode_rows(meta, rows)))

    async def baseline(self, model: str, version: str) -> dict | None:
        """The version's training baseline {feature: 11 edges}, or None when it has none."""
        try:
            return (await self._call("GET", metadata_path(model, version) + "/baseline"))["edges"]
        except AppError as exc:
            if exc.status == 404:
                return None
            raise

    async def index(self, ready: bool = False) -> list[dict]:
        return await self._call("POST", "/v2/repository/index", {"ready": ready})

    async def load(self, model: str, config: Mapping | None = None,
                   files: Mapping[str, bytes] | None = None) -> dict:
        self._metadata.clear()
        return await self._call("POST", f"/v2/repository/models/{check_name(model)}/load",
                                _load_body(config, files))

    async def unload(self, model: str) -> dict:
        self._metadata.clear()
        return await self._call("POST", f"/v2/repository/models/{check_name(model)}/unload", {})


class ModelClient(_Base):
    """The model server for synchronous code (Celery tasks, the CLI); a context manager."""

    def __init__(self, base_url: str, timeout: float = 60.0, *, internal_token: str | None = None,
                 metadata_ttl_s: float = 0.0, http: httpx.Client | None = None):
        super().__init__(internal_token, metadata_ttl_s)
        self.http = http or httpx.Client(base_url=base_url, timeout=httpx.Timeout(timeout, connect=5.0))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, timeout: float | None = None,
              binary: bool = False) -> Any:
        content, headers = _content(body, self.headers, binary)
        extra = {"timeout": timeout} if timeout else {}
        try:
            response = self.http.request(method, path, content=content, headers=headers, **extra)
        except httpx.HTTPError as exc:
            raise unreachable(exc) from None
        return _response_body(_check(response))

    def metadata(self, model: str, version: str | None = None) -> dict:
        path = metadata_path(model, version)
        return self._cached(model, version) or self._remember(model, version, self._call("GET", path))

    def infer(self, model: str, version: str | None, body: dict | bytes, timeout: float | None = None,
              binary: bool = False) -> dict:
        """`binary`: send and receive tensors as bytes (encode_binary); outputs come back as views."""
        return self._call("POST", infer_path(model, version), body, timeout, binary)

    def infer_rows(self, model: str, rows: list[dict], version: str | None = None) -> list[dict]:
        meta = self.metadata(model, version)
        return decode_rows(self.infer(model, meta["parameters"]["version"], encode_rows(meta, rows)))

    def baseline(self, model: str, version: str) -> dict | None:
        """The version's training baseline {feature: 11 edges}, or None when it has none."""
        try:
            return self._call("GET", metadata_path(model, version) + "/baseline")["edges"]
        except AppError as exc:
            if exc.status == 404:
                return None
            raise

    def index(self, ready: bool = False) -> list[dict]:
        return self._call("POST", "/v2/repository/index", {"ready": ready})

    def load(self, model: str, config: Mapping | None = None, files: Mapping[str, bytes] | None = None) -> dict:
        self._metadata.clear()
        return self._call("POST", f"/v2/repository/models/{check_name(model)}/load", _load_body(config, files))

    def unload(self, model: str) -> dict:
        self._metadata.clear()
        return self._call("POST", f"/v2/repository/models/{check_name(model)}/unload", {})
