"""Feature drift: PSI of recent request inputs against the training baseline of the model version.

`baseline.json` in a version folder holds, per feature, 11 quantile edges (deciles) of the
training data. Bins are cut at the distinct inner edges; the expected share of a bin is the share
of deciles it spans (ties, e.g. a count that is mostly 0, merge deciles into one wider bin).
"""
from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.model.client import is_valid_name

from .db import fetch_all
from .tables import drift as drift_table
from .tables import predictions

EPS = 1e-4


def bins(edges: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(cut points, expected share per bin) from quantile edges q0..q10."""
    e = np.asarray(edges, dtype=np.float64)
    k = len(e) - 1
    cuts = np.unique(e[1:-1])
    # P(X <= q_j) = j/k for a continuous feature. Tied edges mean point masses (a count that is
    # mostly 0): then P(X <= c) lies in [j/k, (j+1)/k) for the last decile j at c; take the middle.
    half = 0.5 if len(np.unique(e)) < len(e) else 0.0
    cum = np.array([min(1.0, (np.flatnonzero(e[:-1] == c).max() + half) / k) for c in cuts])
    expected = np.diff(np.concatenate([[0.0], cum, [1.0]]))
    return cuts, expected


def psi(edges: list[float], values) -> float | None:
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not len(x):
        return None
    cuts, expected = bins(edges)
    idx = np.searchsorted(cuts, x, side="left")  # x <= cut[0] -> bin 0
    actual = np.bincount(idx, minlength=len(expected)) / len(x)
    a, e = np.maximum(actual, EPS), np.maximum(expected, EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def drift_report(baseline: dict[str, list[float]], rows: list[dict], threshold: float) -> dict:
    per_feature = {}
    for feature, edges in baseline.items():
        values = [r.get(feature) for r in rows if isinstance(r, dict)]
        values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        value = psi(edges, values)
        per_feature[feature] = None if value is None or math.isnan(value) else round(value, 6)
    scored = [v for v in per_feature.values() if v is not None]
    max_psi = max(scored) if scored else None
    return {"n": len(rows), "psi": per_feature, "max_psi": max_psi, "threshold": threshold,
            "alert": bool(max_psi is not None and max_psi > threshold),
            "drifted": sorted(f for f, v in per_feature.items() if v is not None and v > threshold)}


def load_baseline(repository: Path, model: str, version: str) -> dict | None:
    if not (is_valid_name(model) and is_valid_name(version)):  # names from the log: never a path outside
        return None
    path = Path(repository) / model / version / "baseline.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


async def compute_drift(engine: AsyncEngine, repository: Path, window_s: int, threshold: float,
                        min_rows: int = 100, now: datetime | None = None, max_rows: int = 50_000) -> list[dict]:
    """PSI per feature of each (model, version) with a baseline and enough recent requests; stored."""
    end = now or datetime.now(UTC)
    start = end - timedelta(seconds=window_s)
    p = predictions
    rows = await fetch_all(engine, select(p.c.model, p.c.version, p.c.inputs)
                           .where(p.c.time >= start, p.c.time < end).order_by(p.c.time.desc()).limit(max_rows))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["version"]), []).append(r["inputs"])
    results = []
    for (model, version), inputs in sorted(groups.items()):
        baseline = load_baseline(repository, model, version)
        if baseline is None or len(inputs) < min_rows:
            continue
        results.append({"model": model, "version": version, "window_start": start, "window_end": end,
                        **drift_report(baseline, inputs, threshold)})
    if results:
        async with engine.begin() as conn:
            await conn.execute(insert(drift_table), [
                {k: r[k] for k in ("model", "version", "window_start", "window_end", "n", "psi", "max_psi", "alert",
                                   "threshold")} | {"computed_at": end} for r in results])
    return results


async def latest_drift(engine: AsyncEngine, model: str | None = None) -> list[dict]:
    d = drift_table
    stmt = (select(d.c.model, d.c.version, d.c.window_start, d.c.window_end, d.c.n, d.c.psi, d.c.max_psi,
                   d.c.alert, d.c.threshold, d.c.computed_at)
            .distinct(d.c.model, d.c.version)
            .order_by(d.c.model, d.c.version, d.c.computed_at.desc(), d.c.id.desc()))
    return await fetch_all(engine, stmt if model is None else stmt.where(d.c.model == model))
