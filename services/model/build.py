"""`aistack models build`: train the default models reproducibly into the model repository."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from services.demo import synthetic

from .repository import MANIFEST, Manifest, TensorSpec, write_manifest

log = logging.getLogger("aistack.model.build")
SEED = 42


def _fraud_estimator(version: str):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if version == "1":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=SEED))
    return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.08, random_state=SEED)


def build_fraud(version_dir: Path, version: str) -> Manifest:
    import joblib
    from sklearn.metrics import roc_auc_score

    x, y = synthetic.transactions(seed=SEED)
    split = int(len(y) * 0.8)
    est = _fraud_estimator(version).fit(x[:split], y[:split])
    auc = float(roc_auc_score(y[split:], est.predict_proba(x[split:])[:, 1]))
    joblib.dump(est, version_dir / "model.joblib")
    # Training baseline per feature, for drift monitoring against live requests later.
    baseline = {f: np.quantile(x[:split, i], np.linspace(0, 1, 11)).round(6).tolist()
                for i, f in enumerate(synthetic.FRAUD_FEATURES)}
    (version_dir / "baseline.json").write_text(json.dumps(baseline, indent=2))
    return Manifest(
        name="fraud", version=version, runtime="sklearn",
        inputs=[TensorSpec(f, "FP32", [-1]) for f in synthetic.FRAUD_FEATURES],
        outputs=[TensorSpec("label", "INT64", [-1]), TensorSpec("probability", "FP32", [-1, 2])],
        artifacts={"model.joblib": "", "baseline.json": ""},
        max_batch_size=256, max_queue_delay_ms=2.0, device="cpu",
        parameters={"entity": "customer", "feature_view": "customer_transactions",
                    "request_features": synthetic.REQUEST_FEATURES, "classes": [0, 1],
                    "holdout_auc": round(auc, 4), "seed": SEED, "rows": int(len(y))},
    )


BUILDERS: dict[tuple[str, str], Callable[[Path, str], Manifest]] = {
    ("fraud", "1"): build_fraud,
    ("fraud", "2"): build_fraud,
}


def build(repository: Path, force: bool = False, only: list[str] | None = None) -> list[str]:
    """Build each default model version that is missing; write atomically (temp dir, rename)."""
    built = []
    repository.mkdir(parents=True, exist_ok=True)
    for (name, version), builder in BUILDERS.items():
        if only and name not in only:
            continue
        target = repository / name / version
        if (target / MANIFEST).exists() and not force:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}-", dir=target.parent))
        try:
            write_manifest(tmp, builder(tmp, version))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        built.append(f"{name}/{version}")
        log.info("built model", extra={"model": name, "version": version})
    return built
