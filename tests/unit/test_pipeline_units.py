"""Pipeline domain logic without servers: metrics by hand, PSI, validation, chunking, encoding."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.chassis.errors import AppError
from services.demo import synthetic
from services.pipeline import batch, drift, quality, validation


def test_quality_metrics_match_a_hand_computed_example():
    # y:     1    0    1    1    0    0    1    0
    # pred:  1    0    0    1    1    0    1    0      -> tp=3 fn=1 fp=1 tn=3
    # score: .9   .2   .4   .8   .6   .1   .7   .4
    y = [1, 0, 1, 1, 0, 0, 1, 0]
    pred = [1, 0, 0, 1, 1, 0, 1, 0]
    score = [0.9, 0.2, 0.4, 0.8, 0.6, 0.1, 0.7, 0.4]
    m = quality.binary_metrics(y, pred, score)
    assert m["counts"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert m["n"] == 8 and m["positives"] == 4
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    # Pairs (pos, neg) with pos > neg: .9 beats 4, .8 beats 4, .7 beats 4, .4 beats .2 .1 and ties .4
    # (half) -> 12 + 2.5 = 14.5 of 16.
    assert m["roc_auc"] == pytest.approx(14.5 / 16)


def test_auc_agrees_with_sklearn_and_handles_one_class():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.uniform(size=500), 2)  # ties on purpose
    assert quality.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert quality.roc_auc([1, 1], [0.2, 0.3]) is None


def test_metrics_from_logged_outputs_and_labels():
    pairs = [(1, {"label": 1, "probability": [0.1, 0.9]}), ("0", {"label": 0, "probability": [0.8, 0.2]}),
             (True, {"label": 0, "probability": [0.6, 0.4]}), ("spam", {"label": 1}), (0, None)]
    m = quality.metrics_for_pairs(pairs)
    assert m["n"] == 3 and m["counts"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 1}
    assert m["roc_auc"] == pytest.approx(1.0)


def test_ab_verdict_reports_sample_sizes():
    def v(version, n, correct):
        return {"version": version, "n": n, "accuracy": correct / n, "roc_auc": None,
                "counts": {"tp": correct, "tn": 0, "fp": n - correct, "fn": 0}}

    out = quality.ab_verdict([v("1", 1000, 700), v("2", 1000, 800)])
    assert out["verdict"] == "significant" and out["winner"] == "2" and out["samples"] == {"1": 1000, "2": 1000}
    assert quality.ab_verdict([v("1", 1000, 700), v("2", 1000, 705)])["verdict"] == "no_significant_difference"
    assert quality.ab_verdict([v("1", 10, 7), v("2", 1000, 705)])["verdict"] == "insufficient_data"
    assert quality.ab_verdict([v("1", 10, 7)])["verdict"] == "insufficient_versions"


def _baseline():
    x, _ = synthetic.transactions(seed=42)
    return x, {f: np.quantile(x[:16000, i], np.linspace(0, 1, 11)).tolist()
               for i, f in enumerate(synthetic.FRAUD_FEATURES)}


def test_psi_is_small_for_the_training_distribution_and_large_when_shifted():
    x, base = _baseline()
    for i, f in enumerate(synthetic.FRAUD_FEATURES):
        assert drift.psi(base[f], x[16000:, i]) < 0.1, f
        assert drift.psi(base[f], x[16000:, i] * 3 + 5) > 0.2, f
    rows = [dict(zip(synthetic.FRAUD_FEATURES, r.tolist())) for r in x[16000:17000]]
    for r in rows:
        r["amount"] *= 10
    report = drift.drift_report(base, rows, 0.2)
    assert report["alert"] and report["drifted"] == ["amount"] and report["n"] == 1000


def test_bins_of_tied_deciles():
    cuts, expected = drift.bins([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 4])
    assert cuts.tolist() == [0, 1] and expected.sum() == pytest.approx(1.0)
    assert expected[0] == pytest.approx(0.85)


def _clean(n=3000, seed=5):
    x, y = synthetic.transactions(n=n, seed=seed)
    return {f: x[:, i].tolist() for i, f in enumerate(synthetic.FRAUD_FEATURES)}, y.tolist()


def test_validation_passes_clean_data_and_refuses_poison():
    cols, y = _clean()
    features = synthetic.FRAUD_FEATURES
    ok = validation.validate(cols, y, features, validation.FRAUD_RANGES, reference_positive_share=0.08)
    assert ok.ok, ok.as_dict()

    flipped = [1 - v if i % 5 < 2 else v for i, v in enumerate(y)]  # 40% of labels flipped
    bad = validation.validate(cols, flipped, features, validation.FRAUD_RANGES, reference_positive_share=0.08)
    assert not bad.ok and "label_balance" in bad.failed()

    ranged = {**cols, "account_age_days": [-1e6 if i % 3 == 0 else v for i, v in enumerate(cols["account_age_days"])]}
    bad = validation.validate(ranged, y, features, validation.FRAUD_RANGES)
    report = bad.as_dict()
    assert report["failed"] == ["ranges"]
    check = next(c for c in report["checks"] if c["name"] == "ranges")
    assert check["detail"]["account_age_days"]["share"] == pytest.approx(1 / 3, abs=0.01)

    nulls = {**cols, "amount": [None] * 100 + cols["amount"][100:]}
    dupes = {f: v[:500] * 6 for f, v in cols.items()}
    assert "nulls" in validation.validate(nulls, y, features).failed()
    assert "duplicates" in validation.validate(dupes, y[:500] * 6, features).failed()
    assert "schema" in validation.validate({"amount": cols["amount"]}, y, features).failed()


def test_split_is_idempotent_and_keeps_every_row_once(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(1050)))
    files = batch.JobFiles(tmp_path, "j1")
    assert batch.split_input(files, src, "csv", 100) == (11, 1050)
    first = [pq.read_table(files.chunk(i)) for i in range(11)]
    assert batch.split_input(files, src, "csv", 100) == (11, 1050)  # marker: not split again
    rows = pa.concat_tables(first).column("_row").to_pylist()
    assert rows == list(range(1050))
    assert pa.concat_tables(first).column("b").to_pylist() == [i * 2 for i in range(1050)]


def test_columns_encode_and_decode():
    meta = {"inputs": [{"name": "a", "datatype": "FP32", "shape": [-1]}, {"name": "n", "datatype": "INT64",
                                                                          "shape": [-1]}]}
    body = batch.encode_columns(meta, pa.table({"a": [1.5, 2.0], "n": [1, 2], "extra": ["x", "y"]}))
    assert [i["shape"] for i in body["inputs"]] == [[2], [2]]
    with pytest.raises(AppError) as e:
        batch.encode_columns(meta, pa.table({"a": [1.0, None]}))
    assert e.value.status == 422 and e.value.details["missing"] == ["a", "n"] and e.value.details["rows"] == [1]
    cols = batch.decode_columns({"outputs": [{"name": "label", "shape": [2], "data": [0, 1]},
                                             {"name": "probability", "shape": [2, 2], "data": [.9, .1, .3, .7]}]})
    assert cols["label"].tolist() == [0, 1] and cols["probability_1"].tolist() == [.1, .7]


def test_server_side_paths_stay_inside_the_data_dir(tmp_path):
    (tmp_path / "ok.csv").write_text("a\n1\n")
    assert batch.resolve_server_path(tmp_path, "ok.csv") == (tmp_path / "ok.csv").resolve()
    for bad, status in (("../etc/passwd", 403), ("/etc/passwd", 403), ("missing.csv", 404)):
        with pytest.raises(AppError) as e:
            batch.resolve_server_path(tmp_path, bad)
        assert e.value.status == status
