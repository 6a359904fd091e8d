"""Triton's model repository extension: index, load, unload; a load may carry a new version's files.

`POST /v2/repository/models/{name}/load` with `{"parameters": {"config": "<manifest JSON>",
"file:<artifact>": "<base64>", ...}}` (or Triton's `file:<version>/<artifact>`) adds a version (the config's, else the next number) and
serves it; without parameters it rescans the model's folder. `GET /v2/models/{m}/versions/{v}/baseline`
(not Triton's) gives a version's training baseline to drift checks elsewhere. Load and unload change what the
server serves, so they need the internal token; index is read-only. Errors keep the protocol's
`{"error": msg}` shape (a missing token answers the stack's shape, 403).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from services.chassis.internal import require_internal

from .api import _V2_ERROR, v2_error
from .client import is_valid_name
from .deps import Plane
from .service import DataPlane, V2Error

router = APIRouter(prefix="/v2/repository", tags=["v2 repository"], responses={"4XX": _V2_ERROR, "503": _V2_ERROR})
baselines = APIRouter(prefix="/v2/models", tags=["v2"], responses={"4XX": _V2_ERROR, "503": _V2_ERROR})
# Without the internal token: 403 in the stack's error shape (the chassis' check), not the protocol's.
_NO_TOKEN = {"description": "No or wrong internal token", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
admin = APIRouter(prefix="/v2/repository", tags=["v2 repository"], dependencies=[Depends(require_internal)],
                  responses={"403": _NO_TOKEN, "4XX": _V2_ERROR, "503": _V2_ERROR})


@router.post("/index")
async def index(plane: Plane, request: Request) -> list[dict]:
    """Every version in the repository with its state; `{"ready": true}` keeps only ready ones."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
        return v2_error(V2Error(400, 'the body must be {"ready": true|false} or empty'))
    rows = plane.index()
    return [r for r in rows if r["state"] == "READY"] if body.get("ready") else rows


def _upload(parameters: dict) -> tuple[dict | None, dict[str, bytes]]:
    config, files = None, {}
    for key, value in parameters.items():
        if key == "config":
            try:
                config = json.loads(value) if isinstance(value, str) else None
            except ValueError:
                config = None
            if not isinstance(config, dict):
                raise V2Error(400, "parameters.config must be the version's manifest as a JSON string")
        elif key.startswith("file:"):
            try:
                files[key[5:]] = base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise V2Error(400, f"parameters.{key[:80]} is not base64") from None
        else:
            raise V2Error(400, f"unknown load parameter {key[:80]!r}")
    if files and config is None:
        raise V2Error(400, "files need parameters.config (the manifest)")
    return config, _version_paths(config, files)


def _version_paths(config: dict | None, files: dict[str, bytes]) -> dict[str, bytes]:
    """Triton's clients name files `<version>/<file>`: that version becomes the config's (one
    version per load); a plain `<file>` belongs to the config's version, or to the next number."""
    for path in files:
        version, _, artifact = path.rpartition("/")
        if (version and not version.isdigit()) or not is_valid_name(artifact):
            raise V2Error(400, f"artifact name {path[:80]!r} is not a plain file name (or <version>/<file>)")
    versions = {path.split("/", 1)[0] for path in files if "/" in path}
    if not versions:
        return files
    if len(versions) > 1 or any("/" not in path for path in files):
        raise V2Error(400, "files must all name the same version folder, or none")
    (version,) = versions
    if str(config.get("version") or version) != version:
        raise V2Error(400, f"files are for version {version[:20]!r}, the config says {config['version']!r}")
    config["version"] = version
    return {path.split("/", 1)[1]: content for path, content in files.items()}


async def close_versions(gone) -> None:
    """Close the batchers of versions that left (what is still queued there fails with a 503)."""
    for mv in gone:
        if mv.batcher is not None:
            await mv.batcher.close()


async def _load(plane: DataPlane, name: str, parameters: dict) -> dict:
    config, files = _upload(parameters)
    async with plane.repository_lock:
        version = await asyncio.to_thread(plane.add_version, name, config, files) if config is not None else None
        # Loading hashes artifacts and may import torch: off the event loop.
        await close_versions(await asyncio.to_thread(plane.rescan, name))
    rows = [r for r in plane.index() if r["name"] == name]
    return {"name": name, "version": version, "versions": rows}


@admin.post("/models/{name}/load")
async def load(plane: Plane, request: Request, name: str):
    try:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise V2Error(400, "the body is not JSON") from None
        parameters = body.get("parameters", {}) if isinstance(body, dict) else None
        if not isinstance(parameters, dict):
            raise V2Error(400, 'the body must be {"parameters": {...}} or empty')
        return await _load(plane, name, parameters)
    except V2Error as exc:
        return v2_error(exc)


@admin.post("/models/{name}/unload")
async def unload(plane: Plane, name: str):
    try:
        async with plane.repository_lock:
            gone = plane.unload(name)
            await close_versions(gone)
    except V2Error as exc:
        return v2_error(exc)
    return JSONResponse({"name": name, "unloaded": sorted(mv.version for mv in gone)})


@baselines.get("/{model}/versions/{version}/baseline")
async def baseline(plane: Plane, model: str, version: str):
    """The version's training distribution per input feature (11 quantile edges), for drift checks."""
    try:
        return plane.baseline(model, version)
    except V2Error as exc:
        return v2_error(exc)
