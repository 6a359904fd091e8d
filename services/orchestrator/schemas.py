from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PredictRequest(BaseModel):
    """One row in `inputs`, or many in `instances`; values are named features."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] | None = Field(default=None, examples=[{"amount": 120.5, "txn_count_24h": 3}])
    instances: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    version: str | None = Field(default=None, description="Pin a model version; default: the policy's choice.")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.inputs is None) == (self.instances is None):
            raise ValueError("give exactly one of 'inputs' (one row) or 'instances' (a batch)")
        return self

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [self.inputs] if self.inputs is not None else list(self.instances or [])


class Prediction(BaseModel):
    outputs: dict[str, Any]


class PredictResponse(BaseModel):
    prediction_id: str
    model: str
    version: str
    cached: bool = False
    outputs: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] | None = None
