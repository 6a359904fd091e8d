"""Request and response bodies of the pipeline's HTTP API."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from services.model.client import ModelName


class BatchJobRequest(BaseModel):
    path: str = Field(description="Server-side input, relative to (and inside) PIPELINE_DATA_DIR.")
    model: ModelName
    version: ModelName | None = None
    format: Literal["csv", "parquet"] | None = None
    chunk_rows: int | None = Field(default=None, ge=1, le=5_000_000)
    batch_rows: int | None = Field(default=None, ge=1, le=1_000_000)


class TrainRequest(BaseModel):
    since_s: int | None = Field(default=None, ge=1, description="Only labels of predictions this recent.")
    force: bool = Field(default=False, description="Register even if worse than the current version.")


MULTIPART_FIELDS = {"type": "object", "required": ["file", "model"], "properties": {
    "file": {"type": "string", "format": "binary"}, "model": {"type": "string"},
    "version": {"type": "string"}, "format": {"type": "string", "enum": ["csv", "parquet"]},
    "chunk_rows": {"type": "integer"}, "batch_rows": {"type": "integer"}}}

SUBMIT_DOC = {
    "requestBody": {"content": {
        "application/json": {"schema": BatchJobRequest.model_json_schema()},
        "multipart/form-data": {"schema": MULTIPART_FIELDS}}},
    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "Retry-safe submission: the same key with the same request returns the "
                                   "same job (for PIPELINE_IDEMPOTENCY_TTL_S); with another request, 422."}],
}
