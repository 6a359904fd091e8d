"""The prediction path: policy -> features -> cache -> model server -> log. Framework-free."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import httpx
import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from services.chassis.errors import AppError
from services.chassis.telemetry import annotate
from services.chassis.upstream import Proxy, UpstreamError
from services.model.client import check_name, decode_rows, encode_rows

from .cache import PREFIX as CACHE_PREFIX
from .cache import ResponseCache, cache_key
from .policy import Policy, choose_version, combine, mirrors
from .store import PolicyStore

log = logging.getLogger("aistack.orchestrator")

PREDICTIONS = Counter("aistack_orchestrator_predictions_total", "Predictions served (rows)",
                      ["model", "version", "principal", "cached"])
FALLBACKS = Counter("aistack_orchestrator_fallbacks_total", "Requests served by the fallback version",
                    ["model", "failed_version", "fallback_version"])
SHADOW = Counter("aistack_orchestrator_shadow_total", "Shadow comparisons per row", ["model", "version", "agree"])
STAGE = Histogram("aistack_orchestrator_stage_seconds", "Time per stage of the prediction path",
                  ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LOG_ERRORS = Counter("aistack_orchestrator_prediction_log_errors_total", "Prediction log writes that failed")

PREDICTION_STREAM = "orchestrator:predictions"
FEEDBACK_STREAM = "orchestrator:feedback"
PREDICTION_INDEX = "orchestrator:prediction"


def cache_data_key(model: str, input_hash: str) -> str:
    """The Redis key of a cached response (cache.py): the prediction log's input_hash names it."""
    return f"{CACHE_PREFIX}:{model}:{input_hash}"


class ModelGateway:
    """Talks v2 to the model server replicas; caches model metadata so the hot path makes one call."""

    def __init__(self, proxy: Proxy, metadata_ttl_s: float):
        self.proxy = proxy
        self.ttl = metadata_ttl_s
        self._metadata: dict[tuple[str, str | None], tuple[float, dict]] = {}

    async def metadata(self, model: str, version: str | None) -> dict:
        check_name(model)
        if version is not None:
            check_name(version, "version")
        key = (model, version)
        hit = self._metadata.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        meta = (await self._call("GET", path)).json()
        self._metadata[key] = (time.monotonic(), meta)
        return meta

    async def infer(self, model: str, version: str, body: dict, timeout: float | None = None) -> dict:
        check_name(model), check_name(version, "version")
        path = f"/v2/models/{model}/versions/{version}/infer"
        return (await self._call("POST", path, body, timeout)).json()

    async def _call(self, method: str, path: str, body: dict | None = None,
                    timeout: float | None = None) -> httpx.Response:
        # Inference has no side effects: a replica that fails or times out is retried on another.
        content = orjson.dumps(body) if body is not None else b""
        response = await self.proxy.forward(method, path, content, {"content-type": "application/json"},
                                            timeout_s=timeout, idempotent=True)
        if response.status_code == 404:
            raise AppError(404, "model_not_found", _v2_message(response))
        if response.status_code == 400:
            raise AppError(422, "invalid_inputs", _v2_message(response))
        if response.status_code >= 400:
            status = 503 if response.status_code == 503 else 502
            raise UpstreamError(status, "model_error", _v2_message(response),
                                headers={"Retry-After": response.headers.get("Retry-After", "1")})
        return response


def _v2_message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:300]


class FeatureClient:
    """Online features for many entity ids in one call to the feature store."""

    def __init__(self, http: httpx.AsyncClient):
        self.http = http

    async def online(self, entity: str, ids: list[str], view: str) -> dict[str, dict]:
        try:
            r = await self.http.post("/v1/features/online", json={"entity": entity, "ids": ids, "features": [view]})
        except httpx.HTTPError as exc:
            raise AppError(503, "features_unavailable", f"feature store unreachable: {type(exc).__name__}",
                           headers={"Retry-After": "2"}) from None
        if r.status_code != 200:
            raise AppError(502 if r.status_code >= 500 else 422, "features_error",
                           f"feature store answered {r.status_code}", _json_or_text(r))
        return {str(res["id"]): res for res in r.json()["results"]}


def _json_or_text(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return r.text[:300]


@dataclass
class Outcome:
    prediction_id: str
    model: str
    version: str
    cached: bool
    rows: list[dict]


class Predictor:
    def __init__(self, models: ModelGateway, features: FeatureClient | None, cache: ResponseCache,
                 policies: PolicyStore, redis: aioredis.Redis, *, max_batch_rows: int = 1000,
                 log_maxlen: int = 1_000_000, index_ttl_s: int = 7 * 86400):
        self.models, self.features, self.cache, self.policies = models, features, cache, policies
        self.redis = redis
        self.max_batch_rows, self.log_maxlen, self.index_ttl_s = max_batch_rows, log_maxlen, index_ttl_s
        self._background: set[asyncio.Task] = set()

    async def predict(self, model: str, rows: list[dict], principal: str = "anonymous",
                      version: str | None = None, use_cache: bool = True) -> Outcome:
        if not rows:
            raise AppError(422, "empty_batch", "no rows to predict")
        if len(rows) > self.max_batch_rows:
            raise AppError(413, "batch_too_large", f"at most {self.max_batch_rows} rows per request")
        started = time.perf_counter()
        policy = self.policies.get(model)
        if version is None and policy.ensemble:
            versions = policy.ensemble.versions
        else:
            chosen = version or choose_version(policy, model, principal)
            versions = [chosen or str((await self.models.metadata(model, None))["parameters"]["version"])]
        meta = await self.models.metadata(model, versions[0])
        with STAGE.labels("features").time():
            rows = await self._enrich(meta, rows)
        label = versions[0] if len(versions) == 1 else f"ensemble({','.join(versions)}:{policy.ensemble.method})"
        key = cache_key(model, label, rows)

        async def compute() -> dict:
            return await self._infer(model, versions, meta, rows, policy, pinned=version is not None)

        with STAGE.labels("infer").time():
            result, status = await self.cache.get_or_compute(model, key, policy.cache_ttl_s, compute,
                                                             bypass=not use_cache)
        served, outputs = result["version"], result["rows"]
        cached = status in ("hit", "coalesced")
        outcome = Outcome(uuid.uuid4().hex, model, served, cached, outputs)
        annotate(model=model, version=served, cache_hit=cached, batch_size=len(rows), principal=principal)
        PREDICTIONS.labels(model, served, principal, str(cached).lower()).inc(len(rows))
        if version is None and mirrors(policy, model, key) and policy.shadow.version not in versions:
            self._spawn(self._shadow(model, policy.shadow.version, rows, outputs))
        await self._log(outcome, principal, key, rows, time.perf_counter() - started)
        return outcome

    # -- inference with fallback and ensembles ------------------------------------------------
    async def _infer(self, model: str, versions: list[str], meta: dict, rows: list[dict], policy: Policy,
                     pinned: bool) -> dict:
        try:
            per_version = await asyncio.gather(
                *(self._infer_one(model, v, rows, policy.timeout_s) for v in versions))
        except UpstreamError as exc:
            fallback = policy.fallback
            if pinned or not fallback or fallback in versions:
                raise
            log.warning("version failed, using fallback",
                        extra={"model": model, "versions": versions, "fallback": fallback, "error": exc.message})
            FALLBACKS.labels(model, ",".join(versions), fallback).inc()
            # The last resort gets the client's full timeout, and its answer is not cached.
            return {"version": fallback, "rows": await self._infer_one(model, fallback, rows, None),
                    "fallback": True}
        if len(versions) == 1:
            return {"version": versions[0], "rows": per_version[0]}
        label = f"ensemble({','.join(versions)}:{policy.ensemble.method})"
        return {"version": label, "rows": combine(policy.ensemble.method, per_version)}

    async def _infer_one(self, model: str, version: str, rows: list[dict], timeout: float | None) -> list[dict]:
        meta = await self.models.metadata(model, version)
        response = await self.models.infer(model, version, encode_rows(meta, rows), timeout)
        return decode_rows(response)

    async def _shadow(self, model: str, version: str, rows: list[dict], served: list[dict]) -> None:
        """Mirror to the shadow version; its answer is only compared, never returned."""
        try:
            shadow_rows = await self._infer_one(model, version, rows, 30.0)
        except AppError as exc:
            SHADOW.labels(model, version, "error").inc(len(rows))
            log.info("shadow inference failed", extra={"model": model, "version": version, "error": exc.message})
            return
        for a, b in zip(served, shadow_rows):
            SHADOW.labels(model, version, str(a.get("label") == b.get("label")).lower()).inc()

    # -- features ------------------------------------------------------------------------------
    async def _enrich(self, meta: dict, rows: list[dict]) -> list[dict]:
        """Fill the model's inputs from the online store for rows that name an entity id."""
        params = meta.get("parameters", {})
        entity, view = params.get("entity"), params.get("feature_view")
        if not entity or not view or self.features is None:
            return rows
        join_key = params.get("join_key") or f"{entity}_id"
        inputs = [i["name"] for i in meta["inputs"]]
        need = [i for i, r in enumerate(rows) if r.get(join_key) is not None and any(n not in r for n in inputs)]
        if not need:
            return rows
        ids = sorted({str(rows[i][join_key]) for i in need})
        found = await self.features.online(entity, ids, view)
        enriched = list(rows)
        missing: dict[str, list[str]] = {}
        for i in need:
            row = dict(rows[i])
            entity_id = str(row[join_key])
            values = found.get(entity_id, {"values": {}, "statuses": {}})
            for name in inputs:
                if name in row:
                    continue  # what the caller supplies wins
                if values["statuses"].get(name) == "present":
                    row[name] = values["values"][name]
                elif name not in params.get("request_features", []):
                    missing.setdefault(name, []).append(entity_id)
            enriched[i] = row
        if missing:
            detail = {name: {"ids": sorted(set(ids_)), "status": "missing or expired"} for name, ids_ in missing.items()}
            raise AppError(422, "missing_features",
                           f"features unavailable and not supplied: {', '.join(sorted(missing))}", detail)
        return enriched

    # -- prediction log and feedback ---------------------------------------------------------------
    async def _log(self, outcome: Outcome, principal: str, key: str, rows: list[dict], latency_s: float) -> None:
        """Append to the bounded stream the pipeline persists; losing Redis never fails a prediction."""
        entry = {
            "id": outcome.prediction_id, "time": f"{time.time():.6f}", "principal": principal,
            "model": outcome.model, "version": outcome.version, "input_hash": key,
            "inputs": orjson.dumps(rows), "outputs": orjson.dumps(outcome.rows),
            "latency_ms": f"{latency_s * 1000:.3f}", "cached": int(outcome.cached),
        }
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(PREDICTION_STREAM, entry, maxlen=self.log_maxlen, approximate=True)
                pipe.set(f"{PREDICTION_INDEX}:{outcome.prediction_id}",
                         orjson.dumps({"model": outcome.model, "version": outcome.version, "rows": len(rows)}),
                         ex=self.index_ttl_s)
                await pipe.execute()
        except aioredis.RedisError as exc:
            LOG_ERRORS.inc()
            log.warning("prediction log write failed", extra={"prediction_id": outcome.prediction_id,
                                                              "error": str(exc)})

    async def feedback(self, prediction_id: str, label, principal: str, row: int = 0) -> dict:
        raw = await self.redis.get(f"{PREDICTION_INDEX}:{prediction_id}")
        if raw is None:
            raise AppError(404, "prediction_not_found", f"no prediction '{prediction_id}' (unknown or expired)")
        pred = orjson.loads(raw)
        if not 0 <= row < pred["rows"]:
            raise AppError(422, "invalid_row", f"prediction has {pred['rows']} row(s); row {row} is out of range")
        entry_id = await self.redis.xadd(FEEDBACK_STREAM, {
            "prediction_id": prediction_id, "row": row, "label": orjson.dumps(label), "principal": principal,
            "model": pred["model"], "version": pred["version"], "time": f"{time.time():.6f}",
        }, maxlen=self.log_maxlen, approximate=True)
        return {"prediction_id": prediction_id, "model": pred["model"], "version": pred["version"],
                "feedback_id": entry_id.decode()}

    # -- data subjects (docs/privacy.md) ----------------------------------------------------------
    async def _subject_entries(self, stream: str, principal: str, page: int = 1000):
        """Entries of one log stream whose principal is this one (a full XRANGE scan, page by page)."""
        want, start = principal.encode(), "-"
        while True:
            batch = await self.redis.xrange(stream, min=start, max="+", count=page)
            for entry_id, fields in batch:
                if fields.get(b"principal") == want:
                    yield entry_id, fields
            if len(batch) < page:
                return
            last = batch[-1][0].decode()
            ms, _, seq = last.partition("-")
            start = f"{ms}-{int(seq) + 1}"

    async def subject_export(self, principal: str) -> dict:
        """What Redis holds about a principal: its entries in the prediction and feedback log streams
        (not yet expired by the stream's bound) and how many of their responses are cached now."""
        predictions, feedback, cached = [], [], 0
        async for entry_id, f in self._subject_entries(PREDICTION_STREAM, principal):
            predictions.append({"stream_id": entry_id.decode(), "prediction_id": f[b"id"].decode(),
                                "time": float(f[b"time"]), "model": f[b"model"].decode(),
                                "version": f[b"version"].decode(), "input_hash": f[b"input_hash"].decode(),
                                "inputs": orjson.loads(f[b"inputs"]), "outputs": orjson.loads(f[b"outputs"])})
        async for entry_id, f in self._subject_entries(FEEDBACK_STREAM, principal):
            feedback.append({"stream_id": entry_id.decode(), "prediction_id": f[b"prediction_id"].decode(),
                             "row": int(f[b"row"]), "label": orjson.loads(f[b"label"]),
                             "model": f[b"model"].decode(), "version": f[b"version"].decode(),
                             "time": float(f[b"time"])})
        if predictions:
            keys = sorted({cache_data_key(p["model"], p["input_hash"]) for p in predictions})
            cached = int(await self.redis.exists(*keys))
        return {"principal": principal, "prediction_log": predictions, "feedback_log": feedback,
                "cached_responses": cached}

    async def subject_erase(self, principal: str, refs: list[dict] | None = None) -> dict:
        """Delete a principal's log entries, the cached responses and feedback index keys of its
        predictions (those in the streams plus `refs`, which auth gets from the pipeline). Idempotent.

        A cached response is keyed by its inputs, not by who asked: the same inputs from someone else
        share the entry, which is dropped too (a cache miss later, nothing lost)."""
        refs = list(refs or [])
        pred_ids, fb_ids = [], []
        async for entry_id, f in self._subject_entries(PREDICTION_STREAM, principal):
            pred_ids.append(entry_id)
            refs.append({"prediction_id": f[b"id"].decode(), "model": f[b"model"].decode(),
                         "input_hash": f[b"input_hash"].decode()})
        async for entry_id, _ in self._subject_entries(FEEDBACK_STREAM, principal):
            fb_ids.append(entry_id)
        cache_keys = sorted({cache_data_key(r["model"], r["input_hash"]) for r in refs
                             if r.get("model") and r.get("input_hash")})
        index_keys = sorted({f"{PREDICTION_INDEX}:{r['prediction_id']}" for r in refs if r.get("prediction_id")})
        counts = {"prediction_log": 0, "feedback_log": 0, "cached_responses": 0, "prediction_index": 0}
        for i in range(0, len(pred_ids), 500):
            counts["prediction_log"] += await self.redis.xdel(PREDICTION_STREAM, *pred_ids[i:i + 500])
        for i in range(0, len(fb_ids), 500):
            counts["feedback_log"] += await self.redis.xdel(FEEDBACK_STREAM, *fb_ids[i:i + 500])
        for i in range(0, len(cache_keys), 500):
            counts["cached_responses"] += await self.redis.unlink(*cache_keys[i:i + 500])
        for i in range(0, len(index_keys), 500):
            counts["prediction_index"] += await self.redis.unlink(*index_keys[i:i + 500])
        return {"principal": principal, **counts}

    # -- housekeeping ----------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

