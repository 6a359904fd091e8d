"""Training-data validation: the model-poisoning guard. A set that fails any check is refused
with the report, before a model ever sees it.

Checks: schema (every feature present and numeric), nulls, ranges (declared bounds), label values
and balance (positive share near the reference), label consistency (the current model must still
agree with the labels: flipped labels make it look much worse than on its own holdout), duplicate
share, and a minimum size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Bounds a real fraud feature can take; values outside are errors or an attack.
FRAUD_RANGES: dict[str, tuple[float, float]] = {
    "amount": (0.0, 1_000_000.0),
    "txn_count_24h": (0.0, 1_000.0),
    "txn_amount_24h": (0.0, 10_000_000.0),
    "avg_amount_30d": (0.0, 1_000_000.0),
    "account_age_days": (0.0, 36_500.0),
    "chargebacks_90d": (0.0, 100.0),
    "distinct_merchants_7d": (0.0, 1_000.0),
}


@dataclass
class Limits:
    min_rows: int = 200
    max_null_share: float = 0.01
    max_out_of_range_share: float = 0.01
    max_duplicate_share: float = 0.05
    max_label_shift: float = 0.15  # |positive share - reference share|
    min_positive_share: float = 0.005
    max_auc_drop: float = 0.15  # current model's AUC on these labels vs its recorded holdout AUC


@dataclass
class Check:
    name: str
    ok: bool
    value: object = None
    limit: object = None
    detail: dict = field(default_factory=dict)


@dataclass
class Report:
    ok: bool
    rows: int
    checks: list[Check]

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def as_dict(self) -> dict:
        return {"ok": self.ok, "rows": self.rows, "failed": self.failed(), "checks": [asdict(c) for c in self.checks]}


def validate(columns: dict[str, list | np.ndarray], labels, features: list[str],
             ranges: dict[str, tuple[float, float]] | None = None, *, reference_positive_share: float | None = None,
             current_model=None, current_auc: float | None = None, limits: Limits | None = None) -> Report:
    """Validate a candidate training set given as feature columns + labels."""
    limits = limits or Limits()
    ranges = ranges or {}
    checks: list[Check] = []
    n = len(labels)
    checks.append(Check("min_rows", n >= limits.min_rows, n, limits.min_rows))

    missing = [f for f in features if f not in columns]
    matrix = {}
    non_numeric = []
    for f in features:
        if f in columns:
            try:
                matrix[f] = np.asarray([np.nan if v is None else v for v in columns[f]], dtype=np.float64)
            except (TypeError, ValueError):
                non_numeric.append(f)
    checks.append(Check("schema", not missing and not non_numeric, None, None,
                        {"missing": missing, "non_numeric": non_numeric}))

    nulls = {f: float(np.isnan(v).mean()) if n else 0.0 for f, v in matrix.items()}
    worst_null = max(nulls.values(), default=0.0)
    checks.append(Check("nulls", worst_null <= limits.max_null_share, round(worst_null, 6),
                        limits.max_null_share, {f: round(s, 6) for f, s in nulls.items() if s}))

    oor = {}
    for f, v in matrix.items():
        if f in ranges and n:
            lo, hi = ranges[f]
            oor[f] = float(((v < lo) | (v > hi)).mean())
    worst_oor = max(oor.values(), default=0.0)
    checks.append(Check("ranges", worst_oor <= limits.max_out_of_range_share, round(worst_oor, 6),
                        limits.max_out_of_range_share,
                        {f: {"share": round(s, 6), "range": list(ranges[f])} for f, s in oor.items() if s}))

    y = np.asarray(labels, dtype=np.float64) if n else np.zeros(0)
    bad_labels = int((~np.isin(y, [0.0, 1.0])).sum()) if n else 0
    checks.append(Check("label_values", bad_labels == 0, bad_labels, 0))
    positive = float((y == 1).mean()) if n else 0.0
    ok = positive >= limits.min_positive_share and positive <= 1 - limits.min_positive_share
    detail = {"positive_share": round(positive, 6)}
    if reference_positive_share is not None:
        shift = abs(positive - reference_positive_share)
        ok = ok and shift <= limits.max_label_shift
        detail.update(reference=round(reference_positive_share, 6), shift=round(shift, 6))
    checks.append(Check("label_balance", ok, round(positive, 6), limits.max_label_shift, detail))

    if n and matrix and not missing and not non_numeric:
        x = np.column_stack([matrix[f] for f in features])
        keyed = np.column_stack([x, y])
        keyed = keyed[~np.isnan(keyed).any(axis=1)]
        dup = 1.0 - len(np.unique(keyed, axis=0)) / len(keyed) if len(keyed) else 0.0
        checks.append(Check("duplicates", dup <= limits.max_duplicate_share, round(dup, 6),
                            limits.max_duplicate_share))
        if current_model is not None and current_auc is not None and 0 < positive < 1:
            from .quality import roc_auc

            finite = ~np.isnan(x).any(axis=1)
            auc = roc_auc(y[finite].astype(int), current_model.predict_proba(x[finite].astype(np.float32))[:, 1])
            drop = current_auc - auc if auc is not None else None
            checks.append(Check("label_consistency", drop is not None and drop <= limits.max_auc_drop,
                                None if auc is None else round(auc, 6), limits.max_auc_drop,
                                {"current_model_auc_on_set": auc, "current_model_holdout_auc": current_auc,
                                 "drop": drop}))
    return Report(all(c.ok for c in checks), n, checks)
