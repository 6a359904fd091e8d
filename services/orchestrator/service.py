"""The prediction path: resolve the model version, call the model server, shape the answer."""
from __future__ import annotations

import time
import uuid

import httpx

from services.chassis.errors import AppError
from services.model.client import decode_rows, encode_rows


class ModelGateway:
    """Talks v2 to the model server; caches model metadata so the hot path makes one call."""

    def __init__(self, http: httpx.AsyncClient, metadata_ttl_s: float):
        self.http = http
        self.ttl = metadata_ttl_s
        self._metadata: dict[tuple[str, str | None], tuple[float, dict]] = {}

    async def metadata(self, model: str, version: str | None) -> dict:
        key = (model, version)
        hit = self._metadata.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        response = await self._call("GET", path)
        meta = response.json()
        self._metadata[key] = (time.monotonic(), meta)
        return meta

    async def infer(self, model: str, version: str, body: dict) -> dict:
        return (await self._call("POST", f"/v2/models/{model}/versions/{version}/infer", body)).json()

    async def _call(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        try:
            response = await self.http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise AppError(504, "upstream_timeout", "model server timed out") from None
        except httpx.HTTPError as exc:
            raise AppError(503, "model_unavailable", f"model server unreachable: {type(exc).__name__}",
                           headers={"Retry-After": "2"}) from None
        if response.status_code == 404:
            raise AppError(404, "model_not_found", _v2_message(response))
        if response.status_code == 400:
            raise AppError(422, "invalid_inputs", _v2_message(response))
        if response.status_code >= 500:
            raise AppError(503 if response.status_code == 503 else 502, "model_error", _v2_message(response),
                           headers={"Retry-After": response.headers.get("Retry-After", "1")})
        return response


def _v2_message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:300]


class Predictor:
    def __init__(self, models: ModelGateway, max_batch_rows: int):
        self.models = models
        self.max_batch_rows = max_batch_rows

    async def predict(self, model: str, rows: list[dict], version: str | None = None) -> dict:
        if len(rows) > self.max_batch_rows:
            raise AppError(413, "batch_too_large", f"at most {self.max_batch_rows} rows per request")
        meta = await self.models.metadata(model, version)
        resolved = str(meta.get("parameters", {}).get("version") or version or meta["versions"][-1])
        prediction_id = uuid.uuid4().hex
        response = await self.models.infer(model, resolved, encode_rows(meta, rows, prediction_id))
        return {"prediction_id": prediction_id, "model": model, "version": resolved,
                "cached": False, "rows": decode_rows(response)}
