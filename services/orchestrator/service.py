"""The prediction path: policy -> features -> cache -> model server -> log. Framework-free."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from services.chassis.errors import AppError
from services.chassis.internal import publish_audit
from services.chassis.telemetry import annotate
from services.chassis.upstream import UpstreamError
from services.features.client import FeatureStoreClient
from services.model.client import AsyncModelClient, FeatureBinding, decode_rows, encode_rows

from .cache import PREFIX as CACHE_PREFIX
from .cache import ROWS, ResponseCache, cache_key, canonical_inputs, flight_key
from .contract import FEEDBACK_STREAM, PREDICTION_INDEX, PREDICTION_STREAM, FeedbackEntry, PredictionEntry
from .policy import Policy, choose_version, combine, mirrors
from .store import PolicyStore
from .usage import Usage

log = logging.getLogger("aistack.orchestrator")
audit_log = logging.getLogger("aistack.audit")

# Labels are bounded (docs/metrics.md): never a principal, user, key or raw path. Who used what is
# in the prediction log and the usage counters (GET /admin/usage), not in Prometheus.
PREDICTIONS = Counter("aistack_orchestrator_predictions_total", "Predictions served (rows)",
                      ["model", "version", "cached"])
FALLBACKS = Counter("aistack_orchestrator_fallbacks_total", "Requests served by the fallback version",
                    ["model", "failed_version", "fallback_version"])
SHADOW = Counter("aistack_orchestrator_shadow_total", "Shadow comparisons per row", ["model", "version", "agree"])
STAGE = Histogram("aistack_orchestrator_stage_seconds", "Time per stage of the prediction path",
                  ["stage"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
# Children bound once: .labels() takes a lock and a dict lookup per call.
STAGE_FEATURES, STAGE_INFER = STAGE.labels("features"), STAGE.labels("infer")
LOG_ERRORS = Counter("aistack_orchestrator_prediction_log_errors_total", "Prediction log writes that failed")


def cache_data_key(model: str, input_hash: str) -> str:
    """The Redis key of a cached response (cache.py): the prediction log's input_hash names it."""
    return f"{CACHE_PREFIX}:{model}:{input_hash}"


@dataclass
class Outcome:
    prediction_id: str
    model: str
    version: str
    cached: bool
    rows: list[dict]
    fallback: bool = False


class Predictor:
    def __init__(self, models: AsyncModelClient, features: FeatureStoreClient | None, cache: ResponseCache,
                 policies: PolicyStore, redis: aioredis.Redis, *, max_batch_rows: int = 1000,
                 log_maxlen: int = 1_000_000, index_ttl_s: int = 7 * 86400, usage: Usage | None = None):
        self.models, self.features, self.cache, self.policies = models, features, cache, policies
        self.redis = redis
        self.usage = usage or Usage(redis)
        self.max_batch_rows, self.log_maxlen, self.index_ttl_s = max_batch_rows, log_maxlen, index_ttl_s
        self._background: set[asyncio.Task] = set()

    async def predict(self, model: str, rows: list[dict], principal: str = "anonymous",
                      version: str | None = None, use_cache: bool = True) -> Outcome:
        if not rows:
            raise AppError(422, "empty_batch", "no rows to predict")
        if len(rows) > self.max_batch_rows:
            raise AppError(413, "batch_too_large", f"at most {self.max_batch_rows} rows per request")
        started = time.perf_counter()
        prediction_id = uuid.uuid4().hex
        policy = self.policies.get(model)
        pinned = version is not None
        if not pinned and policy.ensemble:
            versions = policy.ensemble.versions
        else:
            chosen = version or choose_version(policy, model, principal)
            versions = [chosen or str((await self.models.metadata(model, None))["parameters"]["version"])]
        metas = [await self.models.metadata(model, v) for v in versions]
        with STAGE_FEATURES.time():
            rows = await self._enrich(metas[0], rows)
        label = versions[0] if len(versions) == 1 else f"ensemble({','.join(versions)}:{policy.ensemble.method})"
        # The answer's identity: the inputs as each version will see them and each version's content.
        bodies = [encode_rows(meta, rows) for meta in metas]
        key = cache_key(model, label, [(v, (m.get("parameters") or {}).get("digest", ""), canonical_inputs(b))
                                       for v, m, b in zip(versions, metas, bodies)])
        # Only a routed request may fall back: it must never share a computation with a pinned one.
        fallback = None if pinned or policy.fallback in versions else policy.fallback
        flight = flight_key(key, pinned=pinned, fallback=fallback, timeout_s=policy.timeout_s)

        async def compute() -> dict:
            return await self._infer(model, versions, bodies, rows, policy, fallback)

        # A stored answer is never a fallback, so a hit is served by `label`: its log entry and usage
        # are known but for the rows, and go in the lookup's own round trip (cache.ROWS stands in).
        on_hit = self._log_commands(
            PredictionEntry(id=prediction_id, time=time.time(), principal=principal, model=model, version=label,
                            input_hash=key, inputs=rows, outputs=[], latency_ms=(time.perf_counter() - started) * 1000,
                            cached=True), len(rows), outputs=ROWS) if use_cache else ()
        with STAGE_INFER.time():
            result, status = await self.cache.get_or_compute(model, key, policy.cache_ttl_s, compute,
                                                             bypass=not use_cache, flight=flight, on_hit=on_hit)
        served, outputs, fell_back = result["version"], result["rows"], bool(result.get("fallback"))
        # A fallback answer is never stored, and never reported as cached even to a coalesced waiter.
        cached = status in ("hit", "coalesced") and not fell_back
        outcome = Outcome(prediction_id, model, served, cached, outputs, fell_back)
        annotate(model=model, version=served, cache_hit=cached, batch_size=len(rows))
        PREDICTIONS.labels(model, served, str(cached).lower()).inc(len(rows))
        shadow = policy.shadow
        if (not pinned and shadow and shadow.version not in versions and (not cached or shadow.mirror_cached)
                and mirrors(policy, model, prediction_id)):
            self._spawn(self._shadow(model, shadow.version, rows, outputs))
        if status != "hit":  # a hit was logged by the lookup itself
            await self._log(outcome, principal, key, rows, time.perf_counter() - started)
        return outcome

    # -- inference with fallback and ensembles ------------------------------------------------
    async def _infer(self, model: str, versions: list[str], bodies: list[dict], rows: list[dict],
                     policy: Policy, fallback: str | None) -> dict:
        try:
            per_version = await asyncio.gather(
                *(self._infer_body(model, v, b, policy.timeout_s) for v, b in zip(versions, bodies)))
        except UpstreamError as exc:
            if not fallback:
                raise
            log.warning("version failed, using fallback",
                        extra={"model": model, "versions": versions, "fallback": fallback, "error": exc.message})
            FALLBACKS.labels(model, ",".join(versions), fallback).inc()
            # The last resort gets the client's full timeout; its answer is never cached nor shared.
            return {"version": fallback, "rows": await self._infer_one(model, fallback, rows, None),
                    "fallback": True}
        if len(versions) == 1:
            return {"version": versions[0], "rows": per_version[0]}
        label = f"ensemble({','.join(versions)}:{policy.ensemble.method})"
        return {"version": label, "rows": combine(policy.ensemble.method, per_version)}

    async def _infer_body(self, model: str, version: str, body: dict, timeout: float | None) -> list[dict]:
        try:
            return decode_rows(await self.models.infer(model, version, body, timeout))
        except UpstreamError as exc:
            if exc.code == "deadline_exceeded" and timeout is not None:
                raise UpstreamError(504, "deadline_exceeded", f"model '{model}' version '{version}' did not "
                                    f"answer within the policy's timeout_s of {timeout:g} s",
                                    {"model": model, "version": version, "timeout_s": timeout}) from None
            raise

    async def _infer_one(self, model: str, version: str, rows: list[dict], timeout: float | None) -> list[dict]:
        meta = await self.models.metadata(model, version)
        return await self._infer_body(model, version, encode_rows(meta, rows), timeout)

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
        binding = FeatureBinding.from_metadata(meta)
        if binding is None or self.features is None:
            return rows
        join_key = binding.join_key
        inputs = [i["name"] for i in meta["inputs"]]
        need = [i for i, r in enumerate(rows) if r.get(join_key) is not None and any(n not in r for n in inputs)]
        if not need:
            return rows
        ids = sorted({str(rows[i][join_key]) for i in need})
        found = await self.features.online(binding.entity, ids, [binding.view])
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
                elif name not in binding.request_features:
                    missing.setdefault(name, []).append(entity_id)
            enriched[i] = row
        if missing:
            detail = {name: {"ids": sorted(set(ids_)), "status": "missing or expired"} for name, ids_ in missing.items()}
            raise AppError(422, "missing_features",
                           f"features unavailable and not supplied: {', '.join(sorted(missing))}", detail)
        return enriched

    # -- prediction log and feedback ---------------------------------------------------------------
    async def _log(self, outcome: Outcome, principal: str, key: str, rows: list[dict], latency_s: float) -> None:
        """Append to the bounded stream the pipeline persists (contract.py) and count the principal's
        usage; losing Redis never fails a prediction."""
        entry = PredictionEntry(
            id=outcome.prediction_id, time=time.time(), principal=principal, model=outcome.model,
            version=outcome.version, input_hash=key, inputs=rows, outputs=outcome.rows,
            latency_ms=latency_s * 1000, cached=outcome.cached, fallback=outcome.fallback)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in self._log_commands(entry, len(rows)):
                    pipe.execute_command(*command)
                await pipe.execute()
        except aioredis.RedisError as exc:
            LOG_ERRORS.inc()
            log.warning("prediction log write failed", extra={"prediction_id": outcome.prediction_id,
                                                              "error": str(exc)})

    def _log_commands(self, entry: PredictionEntry, n_rows: int, outputs: str | None = None) -> list[tuple]:
        """One prediction's writes: the stream entry (`outputs` replaces its JSON when given), the
        feedback index and the principal's usage."""
        fields = entry.to_fields()
        if outputs is not None:
            fields["outputs"] = outputs
        xadd = ["XADD", PREDICTION_STREAM, "MAXLEN", "~", self.log_maxlen, "*"]
        for name, value in fields.items():
            xadd += [name, value]
        # The index names the prediction's principal: feedback on it is its principal's (or its owner's).
        index = orjson.dumps({"model": entry.model, "version": entry.version, "rows": n_rows,
                              "principal": entry.principal})
        return [tuple(xadd), ("SET", f"{PREDICTION_INDEX}:{entry.id}", index, "EX", self.index_ttl_s),
                *self.usage.commands(entry.principal, entry.model, n_rows, entry.cached)]

    async def feedback(self, prediction_id: str, label, principal: str, row: int = 0,
                       owner: str | None = None, admin: bool = False) -> dict:
        """Label a prediction. Only its principal, a caller of the same owning subject (`owner`: the
        user behind an API key) or an admin (audited) may: anyone else's prediction answers 404 like
        an unknown one, so prediction ids can't be probed (issue 13)."""
        raw = await self.redis.get(f"{PREDICTION_INDEX}:{prediction_id}")
        pred = orjson.loads(raw) if raw is not None else None
        owned = pred is not None and pred.get("principal") is not None and (
            pred["principal"] in (principal, owner))
        if pred is None or not (owned or admin):
            raise AppError(404, "prediction_not_found", f"no prediction '{prediction_id}' (unknown or expired)")
        if not owned:
            audit_log.info("admin feedback on another principal's prediction", extra={"actor": principal})
            await publish_audit(self.redis, principal, "prediction.feedback", prediction_id,
                                service="orchestrator", actor_role="admin")
        if not 0 <= row < pred["rows"]:
            raise AppError(422, "invalid_row", f"prediction has {pred['rows']} row(s); row {row} is out of range")
        entry = FeedbackEntry(prediction_id=prediction_id, row=row, label=label, principal=principal,
                              model=pred["model"], version=pred["version"], time=time.time())
        entry_id = await self.redis.xadd(FEEDBACK_STREAM, entry.to_fields(), maxlen=self.log_maxlen,
                                         approximate=True)
        return {"prediction_id": prediction_id, "model": pred["model"], "version": pred["version"],
                "feedback_id": entry_id.decode()}

    # -- data subjects (docs/privacy.md) ----------------------------------------------------------
    async def _entries(self, stream: str, page: int = 1000):
        """Every entry of one log stream (a full XRANGE scan, page by page)."""
        start = "-"
        while True:
            batch = await self.redis.xrange(stream, min=start, max="+", count=page)
            for entry in batch:
                yield entry
            if len(batch) < page:
                return
            ms, _, seq = batch[-1][0].decode().partition("-")
            start = f"{ms}-{int(seq) + 1}"

    async def _subject_predictions(self, principal: str):
        want = principal.encode()
        async for entry_id, fields in self._entries(PREDICTION_STREAM):
            if fields.get(b"principal") == want:
                yield entry_id, _parsed(PredictionEntry, fields)

    async def _subject_feedback(self, principal: str, prediction_ids: set[str]):
        """Feedback the principal gave, and feedback anyone gave about the principal's predictions."""
        async for entry_id, fields in self._entries(FEEDBACK_STREAM):
            given_by, about = fields.get(b"principal", b"").decode(), fields.get(b"prediction_id", b"").decode()
            if given_by == principal or about in prediction_ids:
                yield entry_id, _parsed(FeedbackEntry, fields)

    async def subject_export(self, principal: str) -> dict:
        """What Redis holds about a principal: its entries in the prediction log, the feedback it gave
        or that labels its predictions, its usage counters, and how many of its responses are cached."""
        predictions, feedback, cached = [], [], 0
        async for entry_id, e in self._subject_predictions(principal):
            if e is None:
                continue
            predictions.append({"stream_id": entry_id.decode(), "prediction_id": e.id, "time": e.time,
                                "model": e.model, "version": e.version, "input_hash": e.input_hash,
                                "inputs": e.inputs, "outputs": e.outputs})
        own = {p["prediction_id"] for p in predictions}
        async for entry_id, f in self._subject_feedback(principal, own):
            if f is None:
                continue
            feedback.append({"stream_id": entry_id.decode(), "prediction_id": f.prediction_id, "row": f.row,
                             "label": f.label, "model": f.model, "version": f.version, "time": f.time,
                             "given_by_subject": f.principal == principal})
        if predictions:
            keys = sorted({cache_data_key(p["model"], p["input_hash"]) for p in predictions})
            cached = int(await self.redis.exists(*keys))
        return {"principal": principal, "prediction_log": predictions, "feedback_log": feedback,
                "usage": await self.usage.of(principal), "cached_responses": cached}

    async def subject_erase(self, principal: str, refs: list[dict] | None = None) -> dict:
        """Delete a principal's log entries, the feedback it gave or that labels its predictions (by
        prediction id, whoever gave it: as the pipeline does in its table), its usage counters, and
        the cached responses and feedback index keys of its predictions (those in the stream plus
        `refs`, which auth gets from the pipeline). Idempotent.

        A cached response is keyed by its inputs, not by who asked: the same inputs from someone else
        share the entry, which is dropped too (a cache miss later, nothing lost)."""
        refs = list(refs or [])
        pred_ids, fb_ids = [], []
        async for entry_id, e in self._subject_predictions(principal):
            pred_ids.append(entry_id)
            if e is not None:
                refs.append({"prediction_id": e.id, "model": e.model, "input_hash": e.input_hash})
        own = {r["prediction_id"] for r in refs if r.get("prediction_id")}
        async for entry_id, _ in self._subject_feedback(principal, own):
            fb_ids.append(entry_id)
        cache_keys = sorted({cache_data_key(r["model"], r["input_hash"]) for r in refs
                             if r.get("model") and r.get("input_hash")})
        index_keys = sorted(f"{PREDICTION_INDEX}:{p}" for p in own)
        counts = {"prediction_log": 0, "feedback_log": 0, "cached_responses": 0, "prediction_index": 0}
        for i in range(0, len(pred_ids), 500):
            counts["prediction_log"] += await self.redis.xdel(PREDICTION_STREAM, *pred_ids[i:i + 500])
        for i in range(0, len(fb_ids), 500):
            counts["feedback_log"] += await self.redis.xdel(FEEDBACK_STREAM, *fb_ids[i:i + 500])
        for i in range(0, len(cache_keys), 500):
            counts["cached_responses"] += await self.redis.unlink(*cache_keys[i:i + 500])
        for i in range(0, len(index_keys), 500):
            counts["prediction_index"] += await self.redis.unlink(*index_keys[i:i + 500])
        counts["usage"] = await self.usage.erase(principal)
        return {"principal": principal, **counts}

    # -- housekeeping ----------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _parsed(kind, fields: dict):
    """An entry of the contract's type, or None for a malformed one (still found, and erased)."""
    try:
        return kind.from_fields(fields)
    except (ValueError, TypeError):
        return None
