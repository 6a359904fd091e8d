"""Routes: parse, call the FeatureStore, answer. Public /v1/features/*, admin /admin/features/*."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from services.chassis.errors import error_body
from services.chassis.internal import require_internal

from .deps import StoreDep
from .schemas import (
    ApplyRequest,
    ApplyResponse,
    Change,
    Entity,
    EntitySpec,
    FeatureView,
    FeatureViewSpec,
    HistoricalRequest,
    HistoricalResponse,
    HistoryEntry,
    MaterializeRequest,
    MaterializeResponse,
    OnlineRequest,
    OnlineResponse,
    PushRequest,
    PushResponse,
    RegistryDoc,
    StatsResponse,
)


def _errors(*pairs: tuple[int, str]) -> dict:
    return {code: {"description": desc, "content": {"application/json": {"example": error_body("...", desc)}}}
            for code, desc in pairs}


router = APIRouter(prefix="/v1/features", tags=["features"])
admin = APIRouter(prefix="/admin/features", tags=["features admin"])


@router.post("/online", response_model=OnlineResponse, responses=_errors(
    (404, "unknown entity or view"), (413, "too many ids"),
    (422, "unknown feature, view of another entity, ambiguous names or a bad id")))
async def read_online(body: OnlineRequest, store: StoreDep) -> dict:
    """Latest values per id from the online store, all ids and views in one pipelined Redis round trip.

    Each value has a status: `present`; `missing` (never written, or null); `expired` (older than
    the view's TTL; the value is null, the event time says when it was observed).
    """
    return await store.online(body.entity, body.ids, body.features, body.full_names)


@router.post("/push", response_model=PushResponse, responses=_errors(
    (404, "unknown view"), (413, "too many rows"), (422, "a row does not match the registry; details name the field")))
async def push(body: PushRequest, store: StoreDep) -> dict:
    """Write rows to the offline store (append) and the online store (newer events only)."""
    return await store.push(body.view, body.rows, body.to)


@router.post("/historical", response_model=HistoricalResponse, responses=_errors(
    (404, "unknown entity or view"), (413, "too many rows"), (422, "unknown feature")))
async def historical(body: HistoricalRequest, store: StoreDep) -> dict:
    """Point-in-time correct values: per row, the newest value with event time <= timestamp and
    within the view's TTL, computed in Postgres. Never a value from after the timestamp."""
    rows = [r.model_dump() for r in body.rows]
    return await store.historical(body.entity, rows, body.features, body.full_names)


# -- admin -------------------------------------------------------------------------------------
@admin.get("/entities", response_model=list[Entity])
async def list_entities(store: StoreDep) -> list:
    return list((await store.registry(fresh=True)).entities.values())


@admin.post("/entities", response_model=Change, status_code=201, responses=_errors((409, "exists")))
async def create_entity(spec: EntitySpec, store: StoreDep) -> Change:
    return await store.put("entity", spec, create_only=True)


@admin.get("/entities/{name}", response_model=Entity, responses=_errors((404, "unknown entity")))
async def get_entity(name: str, store: StoreDep) -> Entity:
    return (await store.registry(fresh=True)).entity(name)


@admin.put("/entities/{name}", response_model=Change, responses=_errors((422, "name mismatch")))
async def put_entity(name: str, spec: EntitySpec, store: StoreDep) -> Change:
    _same(name, spec.name)
    return await store.put("entity", spec)


@admin.delete("/entities/{name}", response_model=Change, responses=_errors((404, "unknown"), (409, "in use")))
async def delete_entity(name: str, store: StoreDep) -> Change:
    return await store.delete("entity", name)


@admin.get("/views", response_model=list[FeatureView])
async def list_views(store: StoreDep) -> list:
    return list((await store.registry(fresh=True)).views.values())


@admin.post("/views", response_model=Change, status_code=201, responses=_errors((409, "exists")))
async def create_view(spec: FeatureViewSpec, store: StoreDep) -> Change:
    return await store.put("feature_view", spec, create_only=True)


@admin.get("/views/{name}", response_model=FeatureView, responses=_errors((404, "unknown view")))
async def get_view(name: str, store: StoreDep) -> FeatureView:
    return (await store.registry(fresh=True)).view(name)


@admin.put("/views/{name}", response_model=Change, responses=_errors((409, "entity change"), (422, "invalid")))
async def put_view(name: str, spec: FeatureViewSpec, store: StoreDep) -> Change:
    _same(name, spec.name)
    return await store.put("feature_view", spec)


@admin.delete("/views/{name}", response_model=Change, responses=_errors((404, "unknown view")))
async def delete_view(name: str, store: StoreDep) -> Change:
    """Delete the view, its offline rows, materialisation state and online values."""
    return await store.delete("feature_view", name)


@admin.get("/{kind}/{name}/versions", response_model=list[HistoryEntry])
async def versions(kind: Literal["entities", "views"], name: str, store: StoreDep) -> list:
    """Every version of an entity or view (created, updated, deleted) with its spec."""
    return await store.history("entity" if kind == "entities" else "feature_view", name)


@admin.post("/apply", response_model=ApplyResponse)
async def apply(body: ApplyRequest, store: StoreDep) -> dict:
    """Apply a declarative registry document (what `aistack features apply FILE` sends)."""
    doc = RegistryDoc.model_validate(body.model_dump(exclude={"dry_run"}))
    return {"dry_run": body.dry_run, "changes": await store.apply(doc, dry_run=body.dry_run)}


@admin.post("/materialize", response_model=MaterializeResponse, responses=_errors((404, "unknown view")))
async def materialize(store: StoreDep, body: MaterializeRequest | None = None) -> dict:
    """Copy the newest offline values of an event-time window to the online store.

    Empty body: incremental run per view (from where the last one stopped to now).
    """
    body = body or MaterializeRequest()
    return {"results": await store.materialize(body.views, body.start, body.end)}


@admin.get("/stats", response_model=StatsResponse)
async def stats(store: StoreDep) -> dict:
    return await store.stats()


def _same(path_name: str, body_name: str) -> None:
    from services.chassis.errors import AppError

    if path_name != body_name:
        raise AppError(422, "name_mismatch", f"path says '{path_name}', body says '{body_name}'")


# -- PII and data subjects (docs/privacy.md) -------------------------------------------------------
@admin.post("/pii/rotate", summary="Re-encrypt PII feature values with the current key")
async def rotate_pii_key(store: StoreDep) -> dict:
    """After putting a new key first in FEATURES_PII_KEYS on every replica (old keys kept)."""
    from .privacy import rotate_pii

    return await rotate_pii(store)


internal = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False,
                     dependencies=[Depends(require_internal)])


@internal.get("/subjects", summary="Everything stored about linked entity ids (auth's export)")
async def subject_export(store: StoreDep, entity: Annotated[str, Query(max_length=63)],
                         ids: Annotated[list[str], Query(max_length=1000)]) -> dict:
    from .privacy import subject_export as export

    return await export(store, entity, ids)


@internal.delete("/subjects", summary="Erase the offline rows and online values of linked entity ids")
async def subject_erase(store: StoreDep, entity: Annotated[str, Query(max_length=63)],
                        ids: Annotated[list[str], Query(max_length=1000)]) -> dict:
    from .privacy import subject_erase as erase

    return await erase(store, entity, ids)
