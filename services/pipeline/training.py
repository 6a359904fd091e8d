"""Training: a point-in-time training set from the feedback labels and the feature store, validated
before use (validation.py), trained, evaluated against the current version on a holdout, and
registered as a new version through the model server's own API (its repository extension: the
load request carries the new version's files; the server numbers, hashes and serves it).

The current version is the model server's too: its metadata describes it, and it scores the
holdout itself (RemoteEstimator), so no file of the model server is read here.
"""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.chassis.errors import AppError
from services.demo.recipes import SEED, fraud_estimator
from services.features.client import SyncFeatureStoreClient, present_values
from services.model.client import (
    BASELINE,
    FeatureBinding,
    ModelClient,
    baseline_edges,
    decode_columns,
    encode_columns,
    is_valid_name,
    manifest_parameters,
)

from . import validation
from .db import fetch_all
from .tables import feedback, predictions

log = logging.getLogger("aistack.pipeline.training")
HOLDOUT_SHARE = 0.2


# -- data ------------------------------------------------------------------------------------------
async def labelled_predictions(engine: AsyncEngine, model: str, since: datetime | None = None) -> list[dict]:
    """Every logged prediction row of the model that has a feedback label, oldest first."""
    p, f = predictions, feedback
    return await fetch_all(engine, select(p.c.time, p.c.inputs, f.c.label)
                           .join(f, (f.c.prediction_id == p.c.prediction_id) & (f.c.row == p.c.row))
                           .where(p.c.model == model, p.c.time >= (since or datetime(1970, 1, 1, tzinfo=UTC)))
                           .order_by(p.c.time, p.c.prediction_id, p.c.row))


HistoricalFetch = Callable[[list[tuple[str, datetime]]], list[dict]]


def feature_store_fetch(features: SyncFeatureStoreClient, entity: str, view: str) -> HistoricalFetch:
    """Point-in-time values from the feature store's API (its contract), never its tables; a value
    the store does not have as 'present' is None."""
    def fetch(keys: list[tuple[str, datetime]]) -> list[dict]:
        return [present_values(row) for row in features.historical(entity, keys, [view])]
    return fetch


def point_in_time_set(examples: list[dict], features: list[str], join_key: str,
                      fetch: HistoricalFetch | None) -> tuple[dict[str, list], list]:
    """Columns + labels: entity features as of each prediction's time from the store, request-time
    features (and anything the store lacks) from the logged inputs."""
    keyed = [i for i, e in enumerate(examples) if isinstance(e["inputs"], dict) and e["inputs"].get(join_key) is not None]
    historical: dict[int, dict] = {}
    if fetch is not None and keyed:
        values = fetch([(str(examples[i]["inputs"][join_key]), examples[i]["time"]) for i in keyed])
        historical = dict(zip(keyed, values))
    columns: dict[str, list] = {f: [] for f in features}
    labels = []
    for i, e in enumerate(examples):
        inputs = e["inputs"] if isinstance(e["inputs"], dict) else {}
        store = historical.get(i, {})
        for f in features:
            columns[f].append(store[f] if store.get(f) is not None else inputs.get(f))
        labels.append(e["label"])
    return columns, labels


# -- training ----------------------------------------------------------------------------------------
def current_model(models: ModelClient, model: str) -> dict | None:
    """The served (latest ready) version's v2 metadata, or None when the server has no such model."""
    try:
        return models.metadata(model)
    except AppError as exc:
        if exc.status == 404:
            return None
        raise


def binding(metadata: dict | None) -> FeatureBinding | None:
    return FeatureBinding.from_metadata(metadata) if metadata else None


class RemoteEstimator:
    """predict_proba of a served version, for validation and the holdout comparison."""

    def __init__(self, models: ModelClient, metadata: dict):
        self.models, self.meta = models, metadata
        self.version = metadata["parameters"]["version"]
        self.batch = int(metadata["parameters"].get("max_batch_size") or 1024)
        self.features = [t["name"] for t in metadata["inputs"]]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        out = []
        for lo in range(0, len(x), self.batch):
            part = x[lo:lo + self.batch]
            columns = {f: part[:, i].tolist() for i, f in enumerate(self.features)}
            response = self.models.infer(self.meta["name"], self.version,
                                         encode_columns(self.meta, columns, len(part)))
            cols = decode_columns(response)
            out.append(np.column_stack([np.asarray(cols["probability_0"]), np.asarray(cols["probability_1"])]))
        return np.concatenate(out) if out else np.empty((0, 2))


def _config(metadata: dict, parameters: dict) -> dict:
    """The new version's manifest, from the current one's metadata: same inputs, outputs, runtime."""
    p = metadata["parameters"]
    return {"runtime": metadata["platform"], "inputs": metadata["inputs"], "outputs": metadata["outputs"],
            "max_batch_size": p["max_batch_size"], "max_queue_delay_ms": p["max_queue_delay_ms"],
            "device": p.get("device") or "auto", "parameters": parameters,
            "artifacts": {"model.joblib": "", BASELINE: ""}}


def train_and_register(models: ModelClient, model: str, columns: dict[str, list], labels: list, *,
                       limits: validation.Limits | None = None, ranges: dict | None = None,
                       tolerance: float = 0.01, force: bool = False, source: dict | None = None) -> dict:
    """Validate, train, evaluate against the current version, register. Returns the report:
    status refused (validation failed), rejected (worse than current), or registered."""
    import joblib

    if not is_valid_name(model):
        return {"status": "refused", "reason": f"{model[:80]!r} is not a valid model name"}
    meta = current_model(models, model)
    if meta is None:
        return {"status": "refused", "reason": f"no current version of {model} to start from"}
    cur_version = meta["parameters"]["version"]
    features = [t["name"] for t in meta["inputs"]]
    cur_est = RemoteEstimator(models, meta)
    params = manifest_parameters(meta)
    reference = params.get("positive_share")
    x_all = None
    try:
        x_all = np.column_stack([np.asarray([np.nan if v is None else v for v in columns[f]], dtype=np.float64)
                                 for f in features])
    except (KeyError, TypeError, ValueError):
        pass
    if reference is None and x_all is not None and len(x_all):
        finite = ~np.isnan(x_all).any(axis=1)
        if finite.any():  # what the current model expects the positive share of these rows to be
            reference = float(cur_est.predict_proba(x_all[finite].astype(np.float32))[:, 1].mean())
    report = validation.validate(columns, labels, features, ranges if ranges is not None else validation.FRAUD_RANGES,
                                 reference_positive_share=reference, current_model=cur_est,
                                 current_auc=params.get("holdout_auc"), limits=limits)
    result = {"model": model, "current_version": cur_version, "validation": report.as_dict(),
              "source": source or {}}
    if not report.ok:
        log.warning("training set refused", extra={"model": model, "failed": report.failed()})
        return {**result, "status": "refused", "reason": f"validation failed: {', '.join(report.failed())}"}

    x = x_all.astype(np.float32)
    y = np.asarray(labels, dtype=np.int64)
    split = int(len(y) * (1 - HOLDOUT_SHARE))
    from .quality import roc_auc

    est = fraud_estimator("2").fit(x[:split], y[:split])
    cand_auc = roc_auc(y[split:], est.predict_proba(x[split:])[:, 1])
    cur_auc = roc_auc(y[split:], cur_est.predict_proba(x[split:])[:, 1])
    evaluation = {"holdout_rows": int(len(y) - split), "candidate_auc": cand_auc, "current_auc": cur_auc,
                  "tolerance": tolerance}
    result["evaluation"] = evaluation
    if cand_auc is None or (cur_auc is not None and cand_auc < cur_auc - tolerance and not force):
        return {**result, "status": "rejected", "reason": "candidate is worse than the current version on the holdout"}

    buffer = io.BytesIO()
    joblib.dump(est, buffer)
    baseline = baseline_edges({f: x[:split, i].tolist() for i, f in enumerate(features)})
    config = _config(meta, {
        **params, "holdout_auc": round(float(cand_auc), 4), "rows": len(y), "seed": SEED,
        "positive_share": round(float(y[:split].mean()), 6), "trained_from": source or {},
        "parent_version": cur_version, "trained_at": datetime.now(UTC).isoformat()})
    answer = models.load(model, config, {"model.joblib": buffer.getvalue(),
                                         BASELINE: json.dumps(baseline, indent=2).encode()})
    version = answer["version"]
    state = next((r for r in answer["versions"] if r["version"] == version), {})
    log.info("registered new model version", extra={"model": model, "version": version,
                                                     "state": state.get("state")})
    return {**result, "status": "registered", "version": version, "state": state.get("state"),
            "reason": state.get("reason") or None}
