from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.chassis.upstream import Proxy

from .service import Gateway


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _orchestrator(request: Request) -> Proxy:
    return request.app.state.gateway.proxies["orchestrator"]


def client_ip(request: Request) -> str:
    settings = request.app.state.settings
    if settings.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.client.host if request.client else ""


GatewayDep = Annotated[Gateway, Depends(_gateway)]
OrchestratorProxy = Annotated[Proxy, Depends(_orchestrator)]
ClientIP = Annotated[str, Depends(client_ip)]
