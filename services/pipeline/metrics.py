"""Prometheus gauges of model quality and drift, served by the control app's /metrics."""
from __future__ import annotations

from prometheus_client import Gauge

from .quality import METRICS

QUALITY = Gauge("aistack_model_quality", "Latest model quality per version (labelled predictions in the window)",
                ["model", "version", "metric"])
QUALITY_SAMPLES = Gauge("aistack_model_quality_samples", "Labelled predictions behind the quality figures",
                        ["model", "version"])
DRIFT = Gauge("aistack_feature_drift_psi", "PSI of recent request inputs vs the training baseline",
              ["model", "version", "feature"])
DRIFT_ALERT = Gauge("aistack_feature_drift_alert", "1 when any feature's PSI is above the threshold",
                    ["model", "version"])


def export_quality(rows: list[dict]) -> None:
    for r in rows:
        for m in METRICS:
            if r.get(m) is not None:
                QUALITY.labels(r["model"], r["version"], m).set(r[m])
        QUALITY_SAMPLES.labels(r["model"], r["version"]).set(r["n"])


def export_drift(rows: list[dict]) -> None:
    for r in rows:
        for feature, value in (r.get("psi") or {}).items():
            if value is not None:
                DRIFT.labels(r["model"], r["version"], feature).set(value)
        DRIFT_ALERT.labels(r["model"], r["version"]).set(1.0 if r["alert"] else 0.0)
