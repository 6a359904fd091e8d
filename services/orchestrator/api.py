from __future__ import annotations

from fastapi import APIRouter

from services.chassis.errors import error_body

from .deps import PredictorDep
from .schemas import PredictRequest, PredictResponse

router = APIRouter(prefix="/v1", tags=["predict"])

_ERRORS = {code: {"description": desc, "content": {"application/json": {"example": error_body("...", desc)}}}
           for code, desc in [(404, "unknown model"), (422, "invalid or missing features"),
                              (503, "model server unavailable")]}


@router.post("/predict/{model}", response_model=PredictResponse, response_model_exclude_none=True,
             responses=_ERRORS)
async def predict(model: str, body: PredictRequest, predictor: PredictorDep) -> dict:
    result = await predictor.predict(model, body.rows, body.version)
    rows = result.pop("rows")
    if body.inputs is not None:
        return {**result, "outputs": rows[0]}
    return {**result, "predictions": rows}
