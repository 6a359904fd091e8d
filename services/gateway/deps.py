from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .service import Proxy


def _orchestrator(request: Request) -> Proxy:
    return request.app.state.orchestrator


OrchestratorProxy = Annotated[Proxy, Depends(_orchestrator)]
