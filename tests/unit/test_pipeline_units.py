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


META = {"name": "m", "parameters": {"version": "1"},
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1]}, {"name": "b", "datatype": "INT64", "shape": [-1]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probability", "datatype": "FP32", "shape": [-1, 2]}]}
LIMITS = batch.InputLimits(max_rows=1_000_000, max_bytes=1 << 30)


def test_split_is_idempotent_and_keeps_every_row_once(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(1050)))
    files = batch.JobFiles(tmp_path, "j1")
    assert batch.split_input(files, src, "csv", 100, META, LIMITS) == (11, 1050)
    first = [pq.read_table(files.chunk(i)) for i in range(11)]
    assert batch.split_input(files, src, "csv", 100, META, LIMITS) == (11, 1050)  # marker: not split again
    rows = pa.concat_tables(first).column("_row").to_pylist()
    assert rows == list(range(1050))
    assert pa.concat_tables(first).column("b").to_pylist() == [i * 2 for i in range(1050)]
    assert first[0].schema.field("a").type == pa.float64()  # typed as the model expects


def _refusal(fn) -> AppError:
    with pytest.raises(AppError) as e:
        fn()
    return e.value


@pytest.mark.parametrize(("header", "code", "column"), [
    ("a,b,_row", "reserved_column", "_row"), ("a,b,a", "duplicate_column", "a"), ("a,c", "missing_columns", None)])
def test_header_check_names_the_column(tmp_path, header, code, column):
    src = tmp_path / "in.csv"
    src.write_text(header + "\n" + ",".join("1" * header.count(",")) + "1\n")
    head = batch.read_header(src, "csv", LIMITS)
    err = _refusal(lambda: batch.check_columns(head, META, LIMITS))
    assert err.status == 422 and err.code == code
    assert (err.details.get("column") == column) if column else err.details["missing"] == ["b"]
    assert "Arrow" not in err.message and "Multiple matches" not in err.message


def test_parquet_schema_types_and_limits_are_checked_from_the_footer(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"a": ["x", "y"], "b": [1, 2]}), src)
    err = _refusal(lambda: batch.check_columns(batch.read_header(src, "parquet", LIMITS), META, LIMITS))
    assert err.code == "invalid_column_type" and err.details["column"] == "a"
    pq.write_table(pa.table({"a": [1.0] * 50, "b": [1] * 50}), src)
    err = _refusal(lambda: batch.check_columns(batch.read_header(src, "parquet", LIMITS), META,
                                               batch.InputLimits(max_rows=10, max_bytes=1 << 30)))
    assert err.status == 413 and err.code == "quota_rows" and err.details["limit"] == "rows"


def test_bad_values_fail_in_the_projects_words(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("a,b\n" + "".join(f"{i},{i}\n" for i in range(500)) + "1.5,seven\n")
    err = _refusal(lambda: batch.split_input(batch.JobFiles(tmp_path, "j"), src, "csv", 100, META, LIMITS))
    assert err.code == "invalid_value" and err.details == {"row": 500, "column": "b", "value": "seven",
                                                            "expected": "int64"}
    assert "row 500, column 'b'" in err.message and "CSV" not in err.message
    src.write_text("a,b\n1,2\n,3\n")
    err = _refusal(lambda: batch.split_input(batch.JobFiles(tmp_path, "k"), src, "csv", 100, META, LIMITS))
    assert err.code == "missing_values" and err.details == {"column": "a", "rows": [1]}
    src.write_text("a,b,note\n0,0,y\n1,2," + "x" * (batch.CSV_BLOCK * 3) + "\n3,4,y\n" * 3)
    err = _refusal(lambda: batch.split_input(batch.JobFiles(tmp_path, "l"), src, "csv", 100, META, LIMITS))
    assert err.code == "line_too_long" and "straddl" not in err.message


def test_gzip_input_is_bounded_while_it_is_decompressed(tmp_path):
    import gzip

    src = tmp_path / "bomb.csv"
    with gzip.open(src, "wb") as out:
        out.write(b"a,b\n" + b"1,2\n" * 2_000_000)  # 8 MB that compress to a few KB
    assert src.stat().st_size < 100_000
    small = batch.InputLimits(max_rows=10_000_000, max_bytes=1_000_000)
    err = _refusal(lambda: batch.split_input(batch.JobFiles(tmp_path, "g"), src, "csv", 100_000, META, small))
    assert err.status == 413 and err.code == "quota_bytes" and err.details["max"] == 1_000_000
    roomy = batch.InputLimits(max_rows=10_000_000, max_bytes=1 << 30)
    assert batch.split_input(batch.JobFiles(tmp_path, "h"), src, "csv", 1_000_000, META, roomy) == (2, 2_000_000)


def test_a_header_only_input_gives_a_result_with_its_header(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,a,b\n")
    files = batch.JobFiles(tmp_path, "e")
    assert batch.split_input(files, src, "csv", 100, META, LIMITS) == (1, 0)
    assert batch.score_chunk(files, 0, client=None, metadata=META, batch_rows=10) == 0
    csv = b"".join(batch.iter_result_csv(files, 1)).decode()
    assert csv.splitlines() == ['"_row","id","a","b","label","probability_0","probability_1"']


def test_server_side_paths_stay_inside_the_data_dir(tmp_path):
    (tmp_path / "ok.csv").write_text("a\n1\n")
    assert batch.resolve_server_path(tmp_path, "ok.csv") == (tmp_path / "ok.csv").resolve()
    for bad, status in (("../etc/passwd", 403), ("/etc/passwd", 403), ("missing.csv", 404)):
        with pytest.raises(AppError) as e:
            batch.resolve_server_path(tmp_path, bad)
        assert e.value.status == status
