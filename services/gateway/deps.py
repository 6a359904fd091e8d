from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.chassis.clientip import client_address
from services.chassis.upstream import Proxy

from .service import Gateway


# Dependencies are async: a plain def costs a thread-pool hop per request (issue 18).
async def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _orchestrator(request: Request) -> Proxy:
    return request.app.state.gateway.proxies["orchestrator"]


async def client_ip(request: Request) -> str:
    """The chassis's one rule (right-most untrusted X-Forwarded-For), with GATEWAY_TRUSTED_PROXIES."""
    peer = request.client.host if request.client else None
    return client_address(peer, request.headers.get("x-forwarded-for"), request.app.state.trusted_proxies) or ""


GatewayDep = Annotated[Gateway, Depends(_gateway)]
OrchestratorProxy = Annotated[Proxy, Depends(_orchestrator)]
ClientIP = Annotated[str, Depends(client_ip)]
