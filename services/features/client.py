"""The feature store's published contract: what other services may import of `services.features`.

Online reads, point-in-time (historical) retrieval and materialisation over the feature store's
HTTP API, async (the orchestrator) and sync (the pipeline's Celery tasks), with one error
mapping. Light on purpose: httpx and the chassis only, no pandas or numpy, so every image can
carry it. Other services never read the `features` schema or its Redis keys.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

import httpx

from services.chassis.errors import AppError

# The demo feature view the shipped fraud model reads (defaults.yaml declares it).
DEMO_ENTITY = "customer"
DEMO_JOIN_KEY = "customer_id"
DEMO_VIEW = "customer_transactions"

ONLINE_PATH = "/v1/features/online"
HISTORICAL_PATH = "/v1/features/historical"
MATERIALIZE_PATH = "/admin/features/materialize"
HISTORICAL_CHUNK = 5000


class FeatureStoreError(AppError):
    """The feature store failed or refused. `retryable`: unreachable or a 5xx (try again later);
    otherwise the request itself was wrong (an unknown view, a bad id) and retrying will not help."""

    def __init__(self, status: int, code: str, message: str, details: Any = None, *, retryable: bool,
                 headers: dict[str, str] | None = None):
        super().__init__(status, code, message, details, headers)
        self.retryable = retryable


@dataclass(frozen=True)
class FeatureRef:
    """A feature view and the entity it describes: what a model's feature binding names."""

    entity: str
    view: str
    join_key: str


def _unreachable(exc: Exception) -> FeatureStoreError:
    return FeatureStoreError(503, "features_unavailable", f"feature store unreachable: {type(exc).__name__}",
                             retryable=True, headers={"Retry-After": "2"})


def _check(r: httpx.Response) -> Any:
    """The body of a 200, or the one error mapping: a 5xx is the store's fault (502, retryable),
    a 4xx is the request's (422), with the store's own error as details."""
    if r.status_code == 200:
        return r.json()
    try:
        details = r.json()
    except ValueError:
        details = r.text[:300]
    if r.status_code >= 500:
        raise FeatureStoreError(502, "features_error", f"feature store answered {r.status_code}", details,
                                retryable=True)
    raise FeatureStoreError(422, "features_error", f"feature store answered {r.status_code}", details,
                            retryable=False)


def _rows(keys: Iterable[tuple[Any, datetime | str]]) -> list[dict]:
    return [{"id": k, "timestamp": t.isoformat() if isinstance(t, datetime) else t} for k, t in keys]


def _chunks(rows: list[dict], chunk: int) -> Iterable[list[dict]]:
    for lo in range(0, len(rows), chunk):
        yield rows[lo:lo + chunk]


def _materialize_body(views: Sequence[str] | None, start: datetime | str | None,
                      end: datetime | str | None) -> dict:
    body: dict[str, Any] = {"views": list(views) if views else None,
                            "start": start.isoformat() if isinstance(start, datetime) else start,
                            "end": end.isoformat() if isinstance(end, datetime) else end}
    return {k: v for k, v in body.items() if v is not None}


class FeatureStoreClient:
    """Async client over an httpx.AsyncClient whose base_url is the feature store."""

    def __init__(self, http: httpx.AsyncClient):
        self.http = http

    async def _post(self, path: str, body: dict, timeout: float | None = None) -> Any:
        try:
            r = await self.http.post(path, json=body, **({"timeout": timeout} if timeout else {}))
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None
        return _check(r)

    async def online(self, entity: str, ids: Sequence[str | int], features: Sequence[str]) -> dict[str, dict]:
        """Latest values per id: {id: {"values", "statuses", "event_times"}}."""
        data = await self._post(ONLINE_PATH, {"entity": entity, "ids": list(ids), "features": list(features)})
        return {str(res["id"]): res for res in data["results"]}

    async def historical(self, entity: str, keys: Iterable[tuple[Any, datetime | str]], features: Sequence[str],
                         *, chunk: int = HISTORICAL_CHUNK, full_names: bool = False) -> list[dict]:
        """Point-in-time rows for (id, timestamp) pairs, in order (chunked requests)."""
        out: list[dict] = []
        for part in _chunks(_rows(keys), chunk):
            data = await self._post(HISTORICAL_PATH, {"entity": entity, "features": list(features),
                                                      "rows": part, "full_names": full_names})
            out.extend(data["rows"])
        return out

    async def materialize(self, views: Sequence[str] | None = None, start: datetime | str | None = None,
                          end: datetime | str | None = None, timeout: float = 300.0) -> list[dict]:
        """Incremental without a window; per-view results."""
        return (await self._post(MATERIALIZE_PATH, _materialize_body(views, start, end), timeout))["results"]


class SyncFeatureStoreClient:
    """The same contract for synchronous callers (Celery tasks, scripts)."""

    def __init__(self, base_url: str, timeout: float = 60.0, http: httpx.Client | None = None):
        self.http = http or httpx.Client(base_url=base_url, timeout=httpx.Timeout(timeout, connect=5.0))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def _post(self, path: str, body: dict, timeout: float | None = None) -> Any:
        try:
            r = self.http.post(path, json=body, **({"timeout": timeout} if timeout else {}))
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None
        return _check(r)

    def online(self, entity: str, ids: Sequence[str | int], features: Sequence[str]) -> dict[str, dict]:
        data = self._post(ONLINE_PATH, {"entity": entity, "ids": list(ids), "features": list(features)})
        return {str(res["id"]): res for res in data["results"]}

    def historical(self, entity: str, keys: Iterable[tuple[Any, datetime | str]], features: Sequence[str],
                   *, chunk: int = HISTORICAL_CHUNK, full_names: bool = False) -> list[dict]:
        out: list[dict] = []
        for part in _chunks(_rows(keys), chunk):
            data = self._post(HISTORICAL_PATH, {"entity": entity, "features": list(features),
                                                "rows": part, "full_names": full_names})
            out.extend(data["rows"])
        return out

    def materialize(self, views: Sequence[str] | None = None, start: datetime | str | None = None,
                    end: datetime | str | None = None, timeout: float = 300.0) -> list[dict]:
        return self._post(MATERIALIZE_PATH, _materialize_body(views, start, end), timeout)["results"]


def present_values(row: dict) -> dict[str, Any]:
    """A result row's values, None wherever the status is not 'present' (what a model may use)."""
    statuses = row.get("statuses", {})
    return {f: (v if statuses.get(f) == "present" else None) for f, v in row.get("values", {}).items()}
