"""Open Inference Protocol v2 over REST (the KServe/Triton protocol), errors as {"error": msg}."""
from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .deps import Plane
from .service import V2Error

router = APIRouter(prefix="/v2", tags=["v2"])

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


def _json(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
async def server_ready(plane: Plane):
    # The protocol answers a health question with 200 for true and a 4xx for false.
    return JSONResponse({"ready": plane.all_ready}, status_code=200 if plane.all_ready else 400)


@router.get("")
async def server_metadata() -> dict:
    return {"name": "aistack-model", "version": "0.1.0", "extensions": []}


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def model_metadata(plane: Plane, model: str, version: str | None = None):
    try:
        return plane.metadata(model, version)
    except V2Error as exc:
        return v2_error(exc)


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
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
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise V2Error(400, f"request body is not valid JSON: {exc}") from None
        return _json(await plane.infer(model, version, body))
    except V2Error as exc:
        return v2_error(exc)


@router.get("/repository/index", include_in_schema=True)
async def repository_index(plane: Plane) -> list[dict]:
    return plane.index()
