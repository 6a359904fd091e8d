from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .service import DataPlane


async def _plane(request: Request) -> DataPlane:
    """async: a plain def dependency costs a thread-pool hop on every request (issue 18)."""
    return request.app.state.plane


Plane = Annotated[DataPlane, Depends(_plane)]
