"""The orchestrator's published contract: the prediction-log streams and their entry schema.

The pipeline (and anyone else) reads these streams through this module only, never through the
orchestrator's internals. Light on purpose: stdlib and orjson, no numpy/pandas, so every image
can carry it.

Streams (Redis, bounded with MAXLEN ~ ORCHESTRATOR_PREDICTION_LOG_MAXLEN):

- `orchestrator:predictions`: one entry per prediction request (PredictionEntry).
- `orchestrator:feedback`: one entry per ground-truth label (FeedbackEntry).

Field values are strings on the wire (Redis stream fields); JSON fields hold JSON text.
Readers must ignore fields they do not know: new fields are added, never renamed.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["FEEDBACK_STREAM", "PREDICTION_INDEX", "PREDICTION_STREAM", "FeedbackEntry", "PredictionEntry"]

PREDICTION_STREAM = "orchestrator:predictions"
FEEDBACK_STREAM = "orchestrator:feedback"
# `orchestrator:prediction:<id>` -> {"model", "version", "rows"}: lets feedback name a prediction
# for ORCHESTRATOR_FEEDBACK_WINDOW_S. Internal to the orchestrator; listed so erasure can find it.
PREDICTION_INDEX = "orchestrator:prediction"


def _s(fields: dict, key: str, default: str | None = None) -> str | None:
    v = fields.get(key.encode(), fields.get(key))
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class PredictionEntry:
    """One prediction request. `inputs` are the rows as the model saw them (after feature
    enrichment); `outputs` one dict per row. `input_hash` is the response-cache key."""

    id: str
    time: float  # unix seconds
    principal: str  # the gateway's X-Principal: a user id or `apikey:<id>`
    model: str
    version: str  # the version that answered (a fallback's, or `ensemble(1,2:mean)`)
    input_hash: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    latency_ms: float
    cached: bool
    fallback: bool = False  # answered by the policy's fallback version

    def to_fields(self) -> dict[str, str | bytes | int]:
        return {"id": self.id, "time": f"{self.time:.6f}", "principal": self.principal, "model": self.model,
                "version": self.version, "input_hash": self.input_hash, "inputs": orjson.dumps(self.inputs),
                "outputs": orjson.dumps(self.outputs), "latency_ms": f"{self.latency_ms:.3f}",
                "cached": int(self.cached), "fallback": int(self.fallback)}

    @classmethod
    def from_fields(cls, fields: dict) -> PredictionEntry:
        """Parse a stream entry (bytes or str keys); ValueError when it is not a prediction."""
        pid, model = _s(fields, "id"), _s(fields, "model")
        if not pid or not model:
            raise ValueError("prediction entry without id or model")
        inputs, outputs = orjson.loads(_s(fields, "inputs", "[]")), orjson.loads(_s(fields, "outputs", "[]"))
        return cls(id=pid, time=float(_s(fields, "time", "0") or 0), principal=_s(fields, "principal", ""),
                   model=model, version=_s(fields, "version", ""), input_hash=_s(fields, "input_hash", ""),
                   inputs=[inputs] if isinstance(inputs, dict) else inputs,
                   outputs=[outputs] if isinstance(outputs, dict) else outputs,
                   latency_ms=float(_s(fields, "latency_ms", "0") or 0),
                   cached=_s(fields, "cached", "0") in ("1", "true", "True"),
                   fallback=_s(fields, "fallback", "0") in ("1", "true", "True"))

    @property
    def when(self) -> datetime:
        return datetime.fromtimestamp(self.time, tz=UTC)


@dataclass(frozen=True)
class FeedbackEntry:
    """A ground-truth label for one row of a prediction, given by `principal` (who may be someone
    other than the prediction's own principal)."""

    prediction_id: str
    row: int
    label: Any  # JSON value
    principal: str
    model: str
    version: str
    time: float

    def to_fields(self) -> dict[str, str | bytes | int]:
        return {"prediction_id": self.prediction_id, "row": self.row, "label": orjson.dumps(self.label),
                "principal": self.principal, "model": self.model, "version": self.version,
                "time": f"{self.time:.6f}"}

    @classmethod
    def from_fields(cls, fields: dict) -> FeedbackEntry:
        pid, label = _s(fields, "prediction_id"), _s(fields, "label")
        if not pid or label is None:
            raise ValueError("feedback entry without prediction_id or label")
        return cls(prediction_id=pid, row=int(_s(fields, "row", "0")), label=orjson.loads(label),
                   principal=_s(fields, "principal", ""), model=_s(fields, "model", ""),
                   version=_s(fields, "version", ""), time=float(_s(fields, "time", "0") or 0))

    @property
    def when(self) -> datetime:
        return datetime.fromtimestamp(self.time, tz=UTC)
