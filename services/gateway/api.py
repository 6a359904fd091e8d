from __future__ import annotations

from fastapi import APIRouter, Request, Response

from .deps import OrchestratorProxy
from .service import HOP_BY_HOP

router = APIRouter(prefix="/v1", tags=["predict"])


async def _relay(proxy, request: Request) -> Response:
    upstream = await proxy.forward(request.method, request.url.path, await request.body(),
                                   dict(request.headers), request.url.query)
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding", "date", "server"}}
    return Response(upstream.content, status_code=upstream.status_code, headers=headers)


@router.post("/predict/{model}", summary="Predict with a model (single row or batch)")
async def predict(model: str, request: Request, proxy: OrchestratorProxy) -> Response:
    """Body as the orchestrator's PredictRequest: {"inputs": {...}} or {"instances": [...]}."""
    return await _relay(proxy, request)
