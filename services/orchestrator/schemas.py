from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .policy import Policy


class PredictRequest(BaseModel):
    """One row in `inputs`, or many in `instances`; values are named features. A row that names
    its entity (e.g. `customer_id`) gets the model's other features from the feature store."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": {"customer_id": "C0001", "amount": 120.5}},
        {"instances": [{"customer_id": "C0001", "amount": 120.5}, {"customer_id": "C0002", "amount": 9.99}]},
    ]})

    inputs: dict[str, Any] | None = None
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


class PredictResponse(BaseModel):
    prediction_id: str
    model: str
    version: str
    cached: bool
    outputs: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: str = Field(min_length=1, max_length=64)
    label: int | float | str | bool = Field(description="The true outcome, e.g. 1 for fraud.")
    row: int = Field(0, ge=0, description="Which row of a batch prediction this label is for.")


class FeedbackResponse(BaseModel):
    prediction_id: str
    model: str
    version: str
    feedback_id: str


class EmbeddingsRequest(BaseModel):
    """The OpenAI embeddings API request (https://platform.openai.com/docs/api-reference/embeddings)."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str] = Field(description="Text or list of texts.")
    model: str = Field(description="Model name, optionally 'name:version'.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0)
    user: str | None = None

    @model_validator(mode="after")
    def _non_empty(self):
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts or any(not t for t in texts):
            raise ValueError("'input' must be a non-empty string or a list of non-empty strings")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class PolicyRecord(BaseModel):
    id: int
    model: str
    policy: Policy
    author: str
    reason: str
    created_at: str


class PolicyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Policy
    reason: str = ""


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: int | None = Field(default=None, description="Policy id to restore; default: the previous one.")
