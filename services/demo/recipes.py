"""The demo fraud model's estimator recipe, shared by the model server's build (versions 1 and 2)
and the pipeline's retraining, which must train the same kind of model the build made. Imports no
service; scikit-learn is imported when a recipe is used (the model and pipeline extras bring it)."""
from __future__ import annotations

SEED = 42


def fraud_estimator(version: str):
    """Version 1 is a scaled logistic regression; every later version gradient-boosted trees."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if version == "1":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=SEED))
    return HistGradientBoostingClassifier(max_iter=150, learning_rate=0.08, random_state=SEED)
