"""Training: a point-in-time training set from the feedback labels and the feature store, validated
before use (validation.py), trained, evaluated against the current version on a holdout, and
registered as a new version in the model repository (version folder, manifest with sha256s).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy.ext.asyncio import AsyncEngine

from services.model.repository import (
    MANIFEST,
    is_valid_name,
    read_manifest,
    scan,
    version_key,
    write_baseline,
    write_manifest,
)

from . import validation
from .db import fetch_all

log = logging.getLogger("aistack.pipeline.training")
HOLDOUT_SHARE = 0.2


# -- data ------------------------------------------------------------------------------------------
async def labelled_predictions(engine: AsyncEngine, model: str, since: datetime | None = None) -> list[dict]:
    """Every logged prediction row of the model that has a feedback label, oldest first."""
    return await fetch_all(engine, """
        SELECT p.time, p.inputs, f.label FROM pipeline.predictions p
        JOIN pipeline.feedback f USING (prediction_id, row)
        WHERE p.model = :model AND p.time >= :since ORDER BY p.time, p.prediction_id, p.row""",
        model=model, since=since or datetime(1970, 1, 1, tzinfo=UTC))


HistoricalFetch = Callable[[list[tuple[str, datetime]]], list[dict]]


def feature_store_fetch(features_url: str, entity: str, view: str, timeout: float = 60.0,
                        batch: int = 5000) -> HistoricalFetch:
    """Point-in-time values from the feature store's `POST /v1/features/historical` (its API, not its DB)."""
    def fetch(keys: list[tuple[str, datetime]]) -> list[dict]:
        out: list[dict] = []
        with httpx.Client(base_url=features_url, timeout=timeout) as http:
            for lo in range(0, len(keys), batch):
                body = {"entity": entity, "features": [view],
                        "rows": [{"id": k, "timestamp": t.isoformat()} for k, t in keys[lo:lo + batch]]}
                r = http.post("/v1/features/historical", json=body)
                r.raise_for_status()
                for row in r.json()["rows"]:
                    vals, statuses = row.get("values", {}), row.get("statuses", {})
                    out.append({f: (v if statuses.get(f, "present") == "present" else None) for f, v in vals.items()})
        return out
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


# -- training --------------------------------------------------------------------------------------
def current_version(repository: Path, model: str) -> tuple[str, Path] | None:
    versions = scan(Path(repository)).get(model, {})
    if not versions:
        return None
    v = sorted(versions, key=version_key)[-1]
    return v, versions[v]


def _next_version(repository: Path, model: str) -> str:
    numeric = [int(v) for v in scan(Path(repository)).get(model, {}) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def train_and_register(repository: Path, model: str, columns: dict[str, list], labels: list, *,
                       limits: validation.Limits | None = None, ranges: dict | None = None,
                       tolerance: float = 0.01, force: bool = False, source: dict | None = None) -> dict:
    """Validate, train, evaluate against the current version, register. Returns the report:
    status refused (validation failed), rejected (worse than current), or registered."""
    import joblib

    from services.model.build import SEED, _fraud_estimator

    if not is_valid_name(model):
        return {"status": "refused", "reason": f"{model[:80]!r} is not a valid model name"}
    repository = Path(repository)
    current = current_version(repository, model)
    if current is None:
        return {"status": "refused", "reason": f"no current version of {model} to start from"}
    cur_version, cur_dir = current
    manifest = read_manifest(cur_dir)
    features = [t.name for t in manifest.inputs]
    cur_est = joblib.load(cur_dir / "model.joblib")
    params = manifest.parameters
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

    est = _fraud_estimator("2").fit(x[:split], y[:split])
    cand_auc = roc_auc(y[split:], est.predict_proba(x[split:])[:, 1])
    cur_auc = roc_auc(y[split:], cur_est.predict_proba(x[split:])[:, 1])
    evaluation = {"holdout_rows": int(len(y) - split), "candidate_auc": cand_auc, "current_auc": cur_auc,
                  "tolerance": tolerance}
    result["evaluation"] = evaluation
    if cand_auc is None or (cur_auc is not None and cand_auc < cur_auc - tolerance and not force):
        return {**result, "status": "rejected", "reason": "candidate is worse than the current version on the holdout"}

    version = _next_version(repository, model)
    target = repository / model / version
    tmp = Path(tempfile.mkdtemp(prefix=f".{model}-{version}-", dir=target.parent))
    try:
        joblib.dump(est, tmp / "model.joblib")
        write_baseline(tmp, x[:split], features)
        new = dataclasses.replace(
            manifest, version=version, artifacts={"model.joblib": "", "baseline.json": ""},
            parameters={**params, "holdout_auc": round(float(cand_auc), 4), "rows": len(y), "seed": SEED,
                        "positive_share": round(float(y[:split].mean()), 6), "trained_from": source or {},
                        "parent_version": cur_version,
                        "trained_at": datetime.now(UTC).isoformat()})
        write_manifest(tmp, new)
        if target.exists():
            raise FileExistsError(f"{target} appeared while training")
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("registered new model version", extra={"model": model, "version": version})
    return {**result, "status": "registered", "version": version, "path": str(target / MANIFEST)}
