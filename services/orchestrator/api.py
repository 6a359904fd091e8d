from __future__ import annotations

import base64
import math
import struct
import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Query, Response
from pydantic import BaseModel, Field

from services.chassis.errors import AppError, error_body
from services.chassis.internal import publish_audit, require_internal
from services.model.client import ModelName

from .deps import Policies, PredictorDep, Principal, UseCache
from .schemas import (EmbeddingsRequest, FeedbackRequest, FeedbackResponse, PolicyRecord, PolicyUpdate,
                      PredictRequest, PredictResponse, RollbackRequest)
from .usage import USAGE_DAYS

router = APIRouter(prefix="/v1", tags=["predict"])
admin = APIRouter(prefix="/admin", tags=["admin"])

_ERRORS = {code: {"description": desc, "content": {"application/json": {"example": error_body("...", desc)}}}
           for code, desc in [(404, "unknown model or prediction"), (422, "invalid or missing features"),
                              (503, "model server unavailable")]}


def _timing(response: Response, started: float) -> None:
    response.headers["Server-Timing"] = f"orchestrator;dur={(time.perf_counter() - started) * 1000:.2f}"


@router.post("/predict/{model}", response_model=PredictResponse, response_model_exclude_none=True,
             responses=_ERRORS)
async def predict(model: ModelName, body: PredictRequest, predictor: PredictorDep, principal: Principal,
                  use_cache: UseCache, response: Response) -> dict:
    started = time.perf_counter()
    out = await predictor.predict(model, body.rows, principal, body.version, use_cache)
    _timing(response, started)
    result = {"prediction_id": out.prediction_id, "model": out.model, "version": out.version, "cached": out.cached,
              "fallback": out.fallback or None}
    if body.inputs is not None:
        return {**result, "outputs": out.rows[0]}
    return {**result, "predictions": out.rows}


@router.post("/embeddings", responses=_ERRORS)
async def embeddings(body: EmbeddingsRequest, predictor: PredictorDep, principal: Principal,
                     use_cache: UseCache) -> Response:
    """OpenAI-compatible embeddings: the official `openai` SDK works against it unchanged.

    The body is encoded once by orjson: FastAPI's encoder would walk every float of every vector,
    which on a cache hit cost more than the lookup (issue 18)."""
    started = time.perf_counter()
    model, _, version = body.model.partition(":")
    texts = body.texts
    out = await predictor.predict(model, [{"text": t} for t in texts], principal, version or None, use_cache)
    data = []
    for i, row in enumerate(out.rows):
        if "embedding" not in row:
            raise AppError(422, "not_an_embedding_model", f"model '{model}' does not return embeddings")
        vector = row["embedding"]
        if body.dimensions:
            vector = vector[: body.dimensions]
            norm = math.sqrt(sum(x * x for x in vector)) or 1.0
            vector = [x / norm for x in vector]
        if body.encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(approx_tokens(t) for t in texts)
    response = Response(orjson.dumps({"object": "list", "data": data, "model": body.model,
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
                        media_type="application/json", headers={"X-Prediction-Id": out.prediction_id})
    _timing(response, started)
    return response


def approx_tokens(text: str) -> int:
    """About four characters a token, as OpenAI's own rule of thumb; good enough for usage."""
    return max(1, math.ceil(len(text) / 4))


@router.post("/feedback", response_model=FeedbackResponse, status_code=202, responses=_ERRORS)
async def feedback(body: FeedbackRequest, predictor: PredictorDep, principal: Principal,
                   x_principal_owner: Annotated[str | None, Header(include_in_schema=False)] = None,
                   x_principal_role: Annotated[str | None, Header(include_in_schema=False)] = None) -> dict:
    """Label one of the caller's predictions (or its owning user's); another's answers 404."""
    return await predictor.feedback(body.prediction_id, body.label, principal, body.row,
                                    owner=x_principal_owner, admin=x_principal_role == "admin")


# -- admin ---------------------------------------------------------------------------------------
@admin.get("/models/{model}/policy")
async def get_policy(model: ModelName, policies: Policies) -> dict:
    return {"model": model, "policy": policies.get(model).model_dump()}


@admin.put("/models/{model}/policy", response_model=PolicyRecord)
async def set_policy(model: ModelName, body: PolicyUpdate, policies: Policies, predictor: PredictorDep,
                     principal: Principal) -> dict:
    for version in sorted(body.policy.versions()):
        try:
            await predictor.models.metadata(model, version)
        except AppError as exc:
            raise AppError(422, "unknown_version", f"model '{model}' version '{version}': {exc.message}") from None
    record = await policies.set(model, body.policy, principal, body.reason)
    await _audit(predictor, principal, "policy.set", model, {"policy_id": record["id"], "reason": body.reason})
    return record


@admin.get("/models/{model}/policy/history", response_model=list[PolicyRecord])
async def policy_history(model: ModelName, policies: Policies) -> list[dict]:
    return await policies.history(model)


@admin.post("/models/{model}/policy/rollback", response_model=PolicyRecord)
async def rollback_policy(model: ModelName, body: RollbackRequest, policies: Policies, principal: Principal,
                          predictor: PredictorDep) -> dict:
    record = await policies.rollback(model, body.to, principal)
    await _audit(predictor, principal, "policy.rollback", model, {"policy_id": record["id"], "to": body.to})
    return record


@admin.get("/usage")
async def usage(predictor: PredictorDep, days: Annotated[int, Query(ge=1, le=USAGE_DAYS)] = 7,
                limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict:
    """Top principals by rows predicted over the last `days` UTC days: per-principal usage lives here
    and in the prediction log, never as a metrics label (docs/metrics.md)."""
    return {"days": days, "principals": await predictor.usage.top(days, limit)}


@admin.get("/cache/stats")
async def cache_stats(predictor: PredictorDep) -> dict:
    return {"replica_counts": await predictor.cache.stats()}


@admin.delete("/cache/{model}")
async def flush_cache(model: ModelName, predictor: PredictorDep, principal: Principal) -> dict:
    deleted = await predictor.cache.flush(model)
    await _audit(predictor, principal, "cache.flush", model, {"deleted": deleted})
    return {"model": model, "deleted": deleted}


async def _audit(predictor, actor: str, action: str, target: str, details: dict) -> None:
    """Admin actions go to auth's audit log (the stream auth:audit:events; docs/privacy.md)."""
    await publish_audit(predictor.redis, actor, action, target, service="orchestrator", actor_role="admin",
                        details=details)


# -- data subjects (docs/privacy.md): internal, never routed by the gateway ------------------------
internal = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False,
                     dependencies=[Depends(require_internal)])


class SubjectRefs(BaseModel):
    """Predictions known elsewhere (the pipeline's persisted rows) whose cache entries must go too."""

    predictions: list[dict[str, str | None]] = Field(default_factory=list, max_length=1_000_000)


@internal.get("/subjects/{principal}")
async def subject_export(principal: str, predictor: PredictorDep) -> dict:
    return await predictor.subject_export(principal)


@internal.delete("/subjects/{principal}")
async def subject_erase(principal: str, predictor: PredictorDep, body: SubjectRefs | None = None) -> dict:
    return await predictor.subject_erase(principal, (body or SubjectRefs()).predictions)
