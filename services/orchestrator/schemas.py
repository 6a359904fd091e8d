from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from services.chassis.limits import reject_non_finite
from services.model.client import ModelName, is_valid_name

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
    version: ModelName | None = Field(default=None, description="Pin a model version; default: the policy's choice.")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.inputs is None) == (self.instances is None):
            raise ValueError("give exactly one of 'inputs' (one row) or 'instances' (a batch)")
        reject_non_finite(self.inputs if self.inputs is not None else self.instances,
                          "inputs" if self.inputs is not None else "instances")
        return self

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [self.inputs] if self.inputs is not None else list(self.instances or [])


class PredictResponse(BaseModel):
    prediction_id: str
    model: str
    version: str
    cached: bool
    fallback: bool | None = Field(default=None, description="true when the policy's fallback version answered "
                                  "(never cached)")
    outputs: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prediction_id: str = Field(min_length=1, max_length=64)
    label: int | float | str | bool = Field(description="The true outcome, e.g. 1 for fraud.")
    row: int = Field(0, ge=0, le=1_000_000, description="Which row of a batch prediction this label is for.")

    @field_validator("label")
    @classmethod
    def _short_label(cls, label):
        if isinstance(label, str) and len(label) > 256:
            raise ValueError("a label has at most 256 characters")
        return label


class FeedbackResponse(BaseModel):
    prediction_id: str
    model: str
    version: str
    feedback_id: str


MAX_TEXTS, MAX_TEXT_CHARS = 256, 8192
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]


class EmbeddingsRequest(BaseModel):
    """The OpenAI embeddings API request (https://platform.openai.com/docs/api-reference/embeddings)."""

    model_config = ConfigDict(extra="ignore")
    input: Text | Annotated[list[Text], Field(max_length=MAX_TEXTS)] = Field(
        description=f"Text or list of texts (at most {MAX_TEXTS}, each at most {MAX_TEXT_CHARS} characters).")
    model: str = Field(description="Model name, optionally 'name:version'.", max_length=129)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0, le=65536)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _non_empty(self):
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts or any(not t for t in texts):
            raise ValueError("'input' must be a non-empty string or a list of non-empty strings")
        name, colon, version = self.model.partition(":")
        if not is_valid_name(name) or (colon and not is_valid_name(version)):
            raise ValueError("'model' must be a model name, optionally ':version' (letters, digits, '_', '.', "
                             "'-', no '..')")
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
    reason: str = Field(default="", max_length=1000)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: int | None = Field(default=None, ge=1, le=2**63 - 1,
                           description="Policy id to restore; default: the previous one.")
