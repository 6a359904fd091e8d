from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .service import FeatureStore


def _store(request: Request) -> FeatureStore:
    return request.app.state.store


StoreDep = Annotated[FeatureStore, Depends(_store)]
