"""Seeded synthetic card transactions: the same seed gives the same data on every machine.

The `fraud` model trains on these rows; the feature store ships the same customer features,
so a prediction enriched from the store sees the distribution the model was trained on.
"""
from __future__ import annotations

import numpy as np

# Customer features of the feature store's `customer_transactions` view, in model input order.
CUSTOMER_FEATURES = [
    "txn_count_24h",
    "txn_amount_24h",
    "avg_amount_30d",
    "account_age_days",
    "chargebacks_90d",
    "distinct_merchants_7d",
]
# Known only at request time: the amount of the transaction being scored.
REQUEST_FEATURES = ["amount"]
FRAUD_FEATURES = REQUEST_FEATURES + CUSTOMER_FEATURES


def customer_profiles(n: int, seed: int = 7) -> dict[str, np.ndarray]:
    """One row of customer features per customer."""
    rng = np.random.default_rng(seed)
    count = rng.poisson(3.0, n).astype(np.float32)
    avg = rng.lognormal(3.5, 0.8, n).astype(np.float32)
    return {
        "txn_count_24h": count,
        "txn_amount_24h": (count * avg * rng.uniform(0.5, 1.5, n)).astype(np.float32),
        "avg_amount_30d": avg,
        "account_age_days": rng.integers(1, 3650, n).astype(np.float32),
        "chargebacks_90d": rng.poisson(0.15, n).astype(np.float32),
        "distinct_merchants_7d": rng.poisson(4.0, n).astype(np.float32),
    }


def transactions(n: int = 20_000, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Features (in FRAUD_FEATURES order) and fraud labels (0/1), about 8% positive."""
    rng = np.random.default_rng(seed)
    cust = customer_profiles(n, seed + 1)
    amount = (cust["avg_amount_30d"] * rng.lognormal(0.0, 0.9, n)).astype(np.float32)
    ratio = amount / np.maximum(cust["avg_amount_30d"], 1.0)
    logit = (
        -4.2
        + 1.1 * np.log1p(ratio)
        + 0.35 * cust["txn_count_24h"] / 3.0
        + 1.4 * cust["chargebacks_90d"]
        - 0.6 * np.log1p(cust["account_age_days"]) / np.log(3650)
        + 0.12 * cust["distinct_merchants_7d"]
        + rng.normal(0, 0.5, n)
    )
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    x = np.column_stack([amount] + [cust[f] for f in CUSTOMER_FEATURES]).astype(np.float32)
    return x, y


def customer_history(n: int, snapshots: int = 4, seed: int = 7) -> list[dict[str, np.ndarray]]:
    """Daily snapshots of customer features, oldest first; the last is exactly customer_profiles(n, seed).

    Earlier days vary the activity features around each customer's profile (the feature store's
    seeded history, so point-in-time retrieval has something to choose between).
    """
    base = customer_profiles(n, seed)
    rng = np.random.default_rng(seed + 1000)
    history = []
    for days_before in range(snapshots - 1, 0, -1):
        count = rng.poisson(np.maximum(base["txn_count_24h"], 0.5)).astype(np.float32)
        avg = (base["avg_amount_30d"] * rng.uniform(0.9, 1.1, n)).astype(np.float32)
        history.append({
            "txn_count_24h": count,
            "txn_amount_24h": (count * avg * rng.uniform(0.5, 1.5, n)).astype(np.float32),
            "avg_amount_30d": avg,
            "account_age_days": np.maximum(base["account_age_days"] - days_before, 1).astype(np.float32),
            "chargebacks_90d": base["chargebacks_90d"].copy(),
            "distinct_merchants_7d": rng.poisson(np.maximum(base["distinct_merchants_7d"], 0.5)).astype(np.float32),
        })
    history.append(base)
    return history
