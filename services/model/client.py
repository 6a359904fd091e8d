"""Client side of the model server's v2 protocol, for the orchestrator and the pipeline.

Turns rows of named features into one v2 request (one tensor per input, batch on axis 0)
and the response back into one dict per row. Pure Python: no numpy in the callers' images.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, StringConstraints

from services.chassis.errors import AppError

from .repository import NAME_PATTERN, is_valid_name

__all__ = ["NAME_PATTERN", "ModelName", "check_name", "decode_rows", "encode_rows", "is_valid_name"]


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


def encode_rows(metadata: dict, rows: list[dict], request_id: str | None = None) -> dict:
    """Build a v2 infer request from rows; a missing or non-numeric feature is the caller's 422."""
    missing: set[str] = set()
    bad_rows: list[int] = []
    inputs = []
    for spec in metadata["inputs"]:
        name, datatype = spec["name"], spec["datatype"]
        column = []
        for i, row in enumerate(rows):
            if name not in row or row[name] is None:
                missing.add(name)
                bad_rows.append(i)
                continue
            try:
                column.append(_cast(datatype, row[name]))
            except (TypeError, ValueError):
                raise AppError(422, "invalid_feature", f"feature '{name}' must be {datatype}, got {row[name]!r}",
                               {"feature": name, "row": i}) from None
        extra_dims = [d for d in spec["shape"][1:]]
        inputs.append({"name": name, "datatype": datatype, "shape": [len(rows), *extra_dims], "data": column})
    if missing:
        raise MissingInputs(sorted(missing), sorted(set(bad_rows)))
    body: dict = {"inputs": inputs}
    if request_id:
        body["id"] = request_id
    return body


def decode_rows(response: dict) -> list[dict]:
    """Split batched output tensors back into one {output: value} dict per row (+ `ood` when sent)."""
    outputs = response["outputs"]
    n = outputs[0]["shape"][0] if outputs else 0
    rows: list[dict] = [{} for _ in range(n)]
    for out in outputs:
        shape, data = out["shape"], out["data"]
        width = 1
        for d in shape[1:]:
            width *= d
        for i in range(n):
            rows[i][out["name"]] = data[i] if len(shape) == 1 else data[i * width:(i + 1) * width]
    # The server's out-of-distribution flag per row (a version with a training baseline), additive.
    ood = (response.get("parameters") or {}).get("ood")
    if isinstance(ood, list) and len(ood) == n:
        for row, flag in zip(rows, ood):
            row["ood"] = bool(flag)
    return rows
