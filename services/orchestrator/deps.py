from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .service import Predictor


def _predictor(request: Request) -> Predictor:
    return request.app.state.predictor


PredictorDep = Annotated[Predictor, Depends(_predictor)]
