"""Model quality: predictions joined with feedback labels, per model version and window.

The metrics are computed here in plain numpy (no sklearn in the hot path, and easy to check by
hand): accuracy, precision, recall, F1, ROC AUC (Mann-Whitney, ties counted half) and the counts.
"""
from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import fetch_all
from .tables import feedback, predictions
from .tables import quality as quality_table

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def roc_auc(y_true, y_score) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half."""
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def binary_metrics(y_true, y_pred, y_score=None) -> dict:
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    tp = int(((y == 1) & (p == 1)).sum())
    tn = int(((y == 0) & (p == 0)).sum())
    fp = int(((y == 0) & (p == 1)).sum())
    fn = int(((y == 1) & (p == 0)).sum())
    n = len(y)
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)) if precision and recall else (
        0.0 if precision is not None and recall is not None else None)
    return {
        "n": n, "positives": int(y.sum()),
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "accuracy": _div(tp + tn, n), "precision": precision, "recall": recall, "f1": f1,
        "roc_auc": roc_auc(y, y_score) if y_score is not None else None,
    }


def _label(value) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)
    if isinstance(value, dict) and "label" in value:
        return _label(value["label"])
    return None


def _score(outputs: dict) -> tuple[int | None, float | None]:
    """(predicted label, score of the positive class) from one output row."""
    if not isinstance(outputs, dict):
        return None, None
    prob = outputs.get("probability")
    score = None
    if isinstance(prob, list) and len(prob) >= 2:
        score = float(prob[1])
    elif isinstance(prob, (int, float)):
        score = float(prob)
    label = outputs.get("label")
    if label is None and score is not None:
        label = int(score >= 0.5)
    return (int(label) if label is not None else None), score


def metrics_for_pairs(pairs: list[tuple]) -> dict:
    """pairs: (true label, output row) -> metrics; rows with an unusable label or output are left out."""
    y, pred, score = [], [], []
    for label, outputs in pairs:
        t = _label(label)
        p, s = _score(outputs)
        if t is None or p is None:
            continue
        y.append(t)
        pred.append(p)
        score.append(s if s is not None else float(p))
    return binary_metrics(y, pred, score)


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float | None, float | None]:
    """z statistic and two-sided p-value for accuracy k1/n1 vs k2/n2."""
    if not n1 or not n2:
        return None, None
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k1 / n1 - k2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def ab_verdict(versions: list[dict], alpha: float = 0.05, min_samples: int = 30) -> dict:
    """Compare the two versions with the most labelled samples on accuracy (two-proportion z-test)."""
    ranked = sorted((v for v in versions if v.get("n")), key=lambda v: -v["n"])[:2]
    if len(ranked) < 2:
        return {"verdict": "insufficient_versions", "detail": "fewer than two versions with labelled predictions"}
    a, b = ranked
    sizes = {a["version"]: a["n"], b["version"]: b["n"]}
    if min(a["n"], b["n"]) < min_samples:
        return {"verdict": "insufficient_data", "samples": sizes, "min_samples": min_samples}
    ka = a["counts"]["tp"] + a["counts"]["tn"]
    kb = b["counts"]["tp"] + b["counts"]["tn"]
    z, p = two_proportion_z(ka, a["n"], kb, b["n"])
    if p is not None and p < alpha:
        winner = a["version"] if ka / a["n"] > kb / b["n"] else b["version"]
        verdict = "significant"
    else:
        winner, verdict = None, "no_significant_difference"
    return {"verdict": verdict, "winner": winner, "metric": "accuracy", "z": z, "p_value": p, "alpha": alpha,
            "samples": sizes, "accuracy": {a["version"]: a["accuracy"], b["version"]: b["accuracy"]},
            "roc_auc": {a["version"]: a["roc_auc"], b["version"]: b["roc_auc"]}}


async def compute_quality(engine: AsyncEngine, window_s: int, now: datetime | None = None) -> list[dict]:
    """Metrics per (model, version) for predictions made in the window that have a label; stored."""
    end = now or datetime.now(UTC)
    start = end - timedelta(seconds=window_s)
    p, f = predictions, feedback
    rows = await fetch_all(engine, select(p.c.model, p.c.version, p.c.outputs, f.c.label)
                           .join(f, (f.c.prediction_id == p.c.prediction_id) & (f.c.row == p.c.row))
                           .where(p.c.time >= start, p.c.time < end))
    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        groups.setdefault((r["model"], r["version"]), []).append((r["label"], r["outputs"]))
    results = []
    for (model, version), pairs in sorted(groups.items()):
        m = metrics_for_pairs(pairs)
        results.append({"model": model, "version": version, "window_start": start, "window_end": end, **m})
    if results:
        async with engine.begin() as conn:
            await conn.execute(insert(quality_table), [
                {k: r[k] for k in ("model", "version", "window_start", "window_end", "n", "positives", *METRICS,
                                   "counts")} | {"computed_at": end} for r in results])
    return results


async def latest_quality(engine: AsyncEngine, model: str | None = None) -> list[dict]:
    """The most recent stored metrics of each version (of one model, or of all)."""
    q = quality_table
    stmt = (select(q.c.model, q.c.version, q.c.window_start, q.c.window_end, q.c.n, q.c.positives,
                   *(q.c[m] for m in METRICS), q.c.counts, q.c.computed_at)
            .distinct(q.c.model, q.c.version)
            .order_by(q.c.model, q.c.version, q.c.computed_at.desc(), q.c.id.desc()))
    return await fetch_all(engine, stmt if model is None else stmt.where(q.c.model == model))

async def quality_report(engine: AsyncEngine, model: str) -> dict:
    versions = await latest_quality(engine, model)
    return {"model": model, "versions": versions, "ab": ab_verdict(versions)}
