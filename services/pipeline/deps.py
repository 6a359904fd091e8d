"""FastAPI dependencies of the pipeline's app, as one-word Annotated aliases."""
from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from .service import Caller, JobService
from .settings import PipelineSettings


def _settings(request: Request) -> PipelineSettings:
    return request.app.state.settings


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def _celery(request: Request) -> Celery:
    return request.app.state.celery


def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


def _caller(x_principal: Annotated[str | None, Header(include_in_schema=False)] = None,
            x_principal_role: Annotated[str | None, Header(include_in_schema=False)] = None,
            x_principal_owner: Annotated[str | None, Header(include_in_schema=False)] = None) -> Caller:
    """Set by the gateway after authentication (it strips any value a client sends); without a
    gateway every caller is the one principal `anonymous`."""
    principal = x_principal or "anonymous"
    is_user = bool(x_principal) and not principal.startswith("apikey:")
    return Caller(principal=principal, role=(x_principal_role or "").lower(),
                  owner=x_principal_owner or (principal if is_user else None))


Settings = Annotated[PipelineSettings, Depends(_settings)]
Engine = Annotated[AsyncEngine, Depends(_engine)]
CeleryDep = Annotated[Celery, Depends(_celery)]
Jobs = Annotated[JobService, Depends(_jobs)]
CallerDep = Annotated[Caller, Depends(_caller)]
