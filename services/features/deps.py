from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .service import FeatureStore


async def _store(request: Request) -> FeatureStore:  # async: no thread-pool hop per request
    return request.app.state.store


StoreDep = Annotated[FeatureStore, Depends(_store)]
