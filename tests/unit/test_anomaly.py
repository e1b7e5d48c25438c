"""Anomaly detection: each labelled kind on small series, edge cases, the CLI contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from meterops.cli import app
from meterops.errors import InputError
from meterops.models.anomaly import (
    ANOMALY_COLUMNS,
    AnomalyDetector,
    average_precision,
    detection_report,
)
from meterops.sources.simulator import FleetSpec, simulate


def series(days: int = 28, meter: str = "m", level: float = 2.0, seed: int = 0) -> pd.DataFrame:
    ts = pd.date_range("2024-01-01", periods=24 * days, freq="h", tz="UTC")
    rng = np.random.default_rng(seed)
    hours = ts.hour.to_numpy()
    shape = 1.0 + 0.6 * np.sin((hours - 6) * 2 * np.pi / 24)
    value = level * shape * np.exp(0.05 * rng.standard_normal(len(ts)))
    return pd.DataFrame({"meter_id": meter, "ts": ts, "value": value})


def detect(frame: pd.DataFrame, **params: object) -> pd.DataFrame:
    return AnomalyDetector(iforest=False, **params).fit_score(frame)  # type: ignore[arg-type]


def test_spike() -> None:
    frame = series()
    frame.loc[300, "value"] *= 5
    out = detect(frame)
    assert out.loc[300, "is_anomaly"] and out.loc[300, "kind"] == "spike"
    assert out["is_anomaly"].sum() <= 3


def test_dropout() -> None:
    frame = series()
    frame.loc[200:205, "value"] = 0.0
    out = detect(frame)
    assert out.loc[200:205, "is_anomaly"].all()
    assert set(out.loc[200:205, "kind"]) == {"dropout"}
    assert out["is_anomaly"].sum() <= 8


def test_stuck() -> None:
    frame = series()
    frame.loc[400:411, "value"] = frame.loc[400, "value"]
    out = detect(frame)
    assert out.loc[400:411, "is_anomaly"].all()
    assert set(out.loc[400:411, "kind"]) == {"stuck"}
    assert out["is_anomaly"].sum() <= 14


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_level_shift_flags_the_whole_span(factor: float) -> None:
    frame = series()
    span = slice(240, 240 + 4 * 24 - 1)
    frame.loc[span, "value"] *= factor
    out = detect(frame)
    inside = out.loc[span]
    assert inside["is_anomaly"].mean() >= 0.9
    assert (inside.loc[inside["is_anomaly"], "kind"] == "level_shift").mean() >= 0.9
    outside = out.drop(index=out.loc[span].index)
    assert outside["is_anomaly"].mean() <= 0.02


def test_meters_of_any_size_share_parameters() -> None:
    small, big = series(meter="small", level=0.01), series(meter="big", level=5000.0, seed=1)
    small.loc[100, "value"] *= 6
    big.loc[100, "value"] *= 6
    frame = pd.concat([small, big], ignore_index=True)
    out = detect(frame)
    assert out.loc[100, "is_anomaly"] and out.loc[len(small) + 100, "is_anomaly"]
    assert out["is_anomaly"].sum() <= 4


def test_constant_series_is_not_anomalous() -> None:
    frame = series().assign(value=3.0)
    out = detect(frame)
    assert len(out) == len(frame) and not out["is_anomaly"].any()


def test_all_missing_and_short_series_do_not_crash() -> None:
    missing = series(days=2).assign(value=np.nan)
    out = detect(missing)
    assert len(out) == len(missing) and (out["score"] == 0).all()
    short = series(days=1).head(3)
    assert len(detect(short)) == 3
    one = series(days=1).head(1)
    assert len(AnomalyDetector(freq="1h").fit_score(one)) == 1
    empty_value = pd.concat([series(days=3), missing.assign(meter_id="gone")], ignore_index=True)
    assert len(AnomalyDetector(seed=1).fit_score(empty_value)) == len(empty_value)


def test_one_row_per_input_row_in_input_order() -> None:
    frame = series(days=7)
    extra = frame.iloc[[5, 5, 17]].copy()
    extra.loc[extra.index[1], "value"] = np.nan
    messy = pd.concat([frame.iloc[::-1], extra], ignore_index=True)
    out = AnomalyDetector(seed=0).fit_score(messy)
    assert list(out.columns) == list(ANOMALY_COLUMNS)
    assert len(out) == len(messy)
    assert (out["ts"].to_numpy() == messy["ts"].to_numpy()).all()
    assert out["score"].between(0, 1).all()
    assert out.loc[len(frame) + 1, "score"] == 0.0  # the missing reading


def test_conventions_seed_and_no_mutation() -> None:
    frame = series(days=7)
    frame.loc[50, "value"] *= 4
    before = frame.copy()
    det = AnomalyDetector(seed=3, residual_z=5.0)
    a = det.fit_score(frame)
    b = det.clone().fit_score(frame)
    pd.testing.assert_frame_equal(frame, before)
    pd.testing.assert_frame_equal(a, b)
    assert det.clone().get_params() == det.get_params()
    assert not det.clone().is_fitted


def test_fit_on_one_frame_score_another() -> None:
    train, test = series(days=21), series(days=7, seed=5)
    test["ts"] = test["ts"] + pd.Timedelta(days=21)
    test.loc[30, "value"] *= 6
    det = AnomalyDetector(iforest=False).fit(train)
    out = det.score(test)
    assert out.loc[30, "is_anomaly"] and out["is_anomaly"].sum() <= 3
    assert np.isfinite(out["expected"]).all()


def test_detection_report() -> None:
    report = detection_report(["", "spike", "stuck", ""], [False, True, False, True])
    assert (report["precision"], report["recall"], report["f1"]) == (0.5, 0.5, 0.5)
    assert report["per_kind"] == {
        "spike": {"n": 1, "recall": 1.0},
        "stuck": {"n": 1, "recall": 0.0},
    }


def test_cli_detect_prints_every_reading(tmp_path: Path) -> None:
    frame = series(days=7)
    frame.loc[60, "value"] *= 6
    frame["label"] = ""
    frame.loc[60, "label"] = "spike"
    path = tmp_path / "r.csv"
    frame.to_csv(path, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
    result = CliRunner().invoke(app, ["detect", str(path), "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "meter_id,ts,score,is_anomaly"
    assert len(lines) == len(frame) + 1
    assert lines[61].endswith(",1")
    assert "recall spike" in result.stderr
    # the one spike has the highest score of the file: a perfect ranking
    assert "pr_auc=1.0000" in result.stderr and "pr_auc 1.0000" in result.stderr


@pytest.mark.slow
def test_simulated_fleet_f1() -> None:
    sim = simulate(FleetSpec(meters=12, periods=24 * 56, seed=11))
    out = AnomalyDetector().fit_score(sim.readings.drop(columns="label"))
    report = detection_report(sim.readings["label"], out["is_anomaly"], out["score"])
    assert report["f1"] >= 0.8, report
    assert report["pr_auc"] >= 0.95, report  # 0.987 when measured
    assert all(m["pr_auc"] >= 0.9 for m in report["per_kind"].values()), report


def test_average_precision_known_values() -> None:
    # ranks: + - + -  -> precision 1 at recall 1/2, 2/3 at recall 1
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    assert average_precision([1, 1, 0, 0], [0.9, 0.8, 0.7, 0.1]) == 1.0
    assert average_precision([0, 0, 1, 1], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(
        (1 / 3 + 2 / 4) / 2
    )
    # ties enter together: all four at one score -> precision 1/2 at recall 1
    assert average_precision([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert average_precision([0, 0], [0.1, 0.2]) is None  # no positives: undefined
    assert average_precision([1, 0], [np.nan, 0.2]) == 0.5  # NaN ranks last


def test_average_precision_matches_scikit_learn() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    truth = rng.random(2000) < 0.1
    scores = np.round(rng.random(2000) + truth * 0.3, 2)  # many ties
    expected = average_precision_score(truth, scores)
    assert average_precision(truth, scores) == pytest.approx(expected, abs=1e-12)


def test_detection_report_pr_auc_overall_and_per_kind() -> None:
    labels = ["", "spike", "", "stuck", "", "stuck"]
    flags = [False, True, False, False, False, True]
    scores = [0.1, 0.9, 0.4, 0.3, 0.2, 0.8]
    report = detection_report(labels, flags, scores)
    # overall ranking: spike .9 +, stuck .8 +, .4 -, stuck .3 +, .2 -, .1 -
    assert report["pr_auc"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert report["base_rate"] == pytest.approx(0.5)
    # per kind, against the normal readings only: stuck .8 +, .4 -, .3 +
    assert report["per_kind"]["stuck"] == {"n": 2, "recall": 0.5, "pr_auc": pytest.approx(5 / 6)}
    assert report["per_kind"]["spike"]["pr_auc"] == 1.0
    assert "pr_auc" not in detection_report(labels, flags)  # no scores, no PR-AUC
    with pytest.raises(InputError, match="scores"):
        detection_report(labels, flags, scores[:-1])
