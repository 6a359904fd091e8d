from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from .service import Predictor
from .store import PolicyStore


# Dependencies are async: a plain def costs a thread-pool hop per request (issue 18).
async def _predictor(request: Request) -> Predictor:
    return request.app.state.predictor


async def _policies(request: Request) -> PolicyStore:
    return request.app.state.policies


async def _principal(x_principal: Annotated[str | None, Header(include_in_schema=False)] = None) -> str:
    """Set by the gateway after authentication (it strips any value a client sends)."""
    return x_principal or "anonymous"


async def _use_cache(cache_control: Annotated[str | None, Header(include_in_schema=False)] = None) -> bool:
    return "no-cache" not in (cache_control or "").lower()


PredictorDep = Annotated[Predictor, Depends(_predictor)]
Policies = Annotated[PolicyStore, Depends(_policies)]
Principal = Annotated[str, Depends(_principal)]
UseCache = Annotated[bool, Depends(_use_cache)]
