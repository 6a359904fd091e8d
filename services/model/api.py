"""Open Inference Protocol v2 over REST (the KServe/Triton protocol), errors as {"error": msg}."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from services.chassis.limits import BodyTooLarge

from .deps import Plane
from .service import HEADER_LENGTH, V2Error, encode_infer_body, parse_infer_body

# The protocol's own error body on every /v2 operation (declared so that clients and fuzzers can
# hold the server to it); a health probe answers "not ready" with 400 and its usual body.
_V2_ERROR = {"description": "Protocol error", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
_NOT_READY = {"description": "Not ready, or a protocol error", "content": {"application/json": {"schema": {
    "anyOf": [{"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
              _V2_ERROR["content"]["application/json"]["schema"]]}}}}
router = APIRouter(prefix="/v2", tags=["v2"], responses={"4XX": _V2_ERROR, "503": _V2_ERROR})

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"}, "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype", "data"]}},
                "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        }}},
    }
}


def v2_error(exc: V2Error) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", responses={400: _NOT_READY})
async def server_ready(plane: Plane):
    # The protocol answers a health question with 200 for true and a 4xx for false.
    return JSONResponse({"ready": plane.all_ready}, status_code=200 if plane.all_ready else 400)


@router.get("")
async def server_metadata() -> dict:
    return {"name": "aistack-model", "version": "0.1.0", "extensions": ["binary_tensor_data", "model_repository"]}


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def model_metadata(plane: Plane, model: str, version: str | None = None):
    try:
        return plane.metadata(model, version)
    except V2Error as exc:
        return v2_error(exc)


@router.get("/models/{model}/ready", responses={400: _NOT_READY})
@router.get("/models/{model}/versions/{version}/ready", responses={400: _NOT_READY})
async def model_ready(plane: Plane, model: str, version: str | None = None):
    try:
        mv = plane.resolve(model, version)
    except V2Error as exc:
        return v2_error(exc)
    return JSONResponse({"name": model, "version": mv.version, "ready": mv.ready},
                        status_code=200 if mv.ready else 400)


@router.post("/models/{model}/infer", openapi_extra=_INFER_BODY)
@router.post("/models/{model}/versions/{version}/infer", openapi_extra=_INFER_BODY)
async def infer(plane: Plane, request: Request, model: str, version: str | None = None):
    try:
        try:
            raw = await request.body()
        except BodyTooLarge as exc:
            raise V2Error(413, exc.detail) from None
        body = parse_infer_body(raw, request.headers.get(HEADER_LENGTH))
        timing: dict = {}
        content, header_length = encode_infer_body(await plane.infer(model, version, body, timing))
    except V2Error as exc:
        return v2_error(exc)
    headers = {"Server-Timing": f"queue;dur={timing['queue'] * 1000:.2f}, model;dur={timing['model'] * 1000:.2f}"}
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


@router.get("/models/{model}/stats")
@router.get("/models/{model}/versions/{version}/stats")
async def model_stats(plane: Plane, model: str, version: str | None = None):
    """Batching statistics (not Triton's statistics extension, so not advertised as one)."""
    try:
        return {"model_stats": plane.stats(model, version)}
    except V2Error as exc:
        return v2_error(exc)


@router.get("/repository/index", include_in_schema=True)
async def repository_index(plane: Plane) -> list[dict]:
    return plane.index()
