from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .service import DataPlane


def _plane(request: Request) -> DataPlane:
    return request.app.state.plane


Plane = Annotated[DataPlane, Depends(_plane)]
