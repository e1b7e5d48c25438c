"""Event probability: exact targets, no leakage, metrics on known numbers, real-data acceptance."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from meterops.errors import ConfigError, InputError
from meterops.features import FeatureSpec
from meterops.models.events import (
    EVENT_PREDICTION_COLUMNS,
    EventForecaster,
    EventTarget,
    backtest_events,
    best_f1_threshold,
    event_metrics,
)

SPEC = FeatureSpec(seasonal_periods=("7d",), rolling_windows=("7d",), calendar="none")


def _rainy(days: int = 360, seed: int = 0) -> pd.DataFrame:
    """A daily weather-like series: rain follows a persistent latent state seen in humidity."""
    rng = np.random.default_rng(seed)
    z = np.zeros(days)
    for i in range(1, days):
        z[i] = 0.8 * z[i - 1] + rng.normal(0, 0.6)
    rain = np.where(z > 0.3, np.round(rng.exponential(3.0, days) * (z > 0.3), 1), 0.0)
    return pd.DataFrame(
        {
            "meter_id": "station",
            "ts": pd.date_range("2023-01-01", periods=days, freq="D", tz="UTC"),
            "value": 10 + 5 * np.sin(np.arange(days) / 58) + rng.normal(0, 1, days),
            "precipitation": rain,
            "humidity": 60 + 15 * z + rng.normal(0, 2, days),
        }
    )


def _cli() -> typer.Typer:
    from meterops.cli_models import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keep "events" a sub-command
        pass

    return app


# --------------------------------------------------------------------------- target


def test_parse_and_validation() -> None:
    t = EventTarget.parse(" precipitation >= 1.5 ", horizon="1d", aggregation="max")
    assert (t.column, t.operator, t.threshold, t.aggregation, t.horizon) == (
        "precipitation",
        ">=",
        1.5,
        "max",
        "1d",
    )
    assert EventTarget.parse("value<-2e1").threshold == -20.0
    for bad in ("precipitation", "rain = 1", "rain > x", "> 1"):
        with pytest.raises(ConfigError):
            EventTarget.parse(bad)
    with pytest.raises(ConfigError):
        EventTarget("value", "!=", 1.0)
    with pytest.raises(ConfigError):
        EventTarget("value", ">", 1.0, aggregation="median")
    with pytest.raises(ConfigError):
        EventTarget("value", ">", float("nan"))


def test_target_construction_is_exact_on_a_toy_series() -> None:
    ts = pd.date_range("2024-01-01", periods=8, freq="h", tz="UTC")
    values = [0.0, 2.0, 1.0, 3.0, np.nan, 1.0, 0.5, 0.2]
    frame = pd.DataFrame({"meter_id": "m", "ts": ts, "value": values, "rain": values[::-1]})
    # period of t = the 3 slots t-2..t; a missing slot makes the event unknown
    summed = EventTarget("value", ">", 3.0, "sum", horizon="3h").labels(frame)
    expected = [np.nan, np.nan, 0.0, 1.0, np.nan, np.nan, np.nan, 0.0]  # sums 3, 6, -, -, -, 1.7
    np.testing.assert_array_equal(summed["event"].to_numpy(), expected)
    assert summed["ts"].tolist() == ts.tolist()
    maxed = EventTarget("value", ">=", 3.0, "max", horizon=2).labels(frame)
    np.testing.assert_array_equal(
        maxed["event"].to_numpy(), [np.nan, 0.0, 0.0, 1.0, np.nan, np.nan, 0.0, 0.0]
    )
    mean = EventTarget("value", "<", 1.0, "mean", horizon=1).labels(frame)
    np.testing.assert_array_equal(
        mean["event"].to_numpy(), [1.0, 0.0, 0.0, 0.0, np.nan, 0.0, 1.0, 1.0]
    )
    # a covariate as the event column, with a gap in time (the grid slot is missing)
    cov = EventTarget("rain", "<=", 1.0, "sum", horizon=1).labels(frame.drop(index=6))
    np.testing.assert_array_equal(
        cov["event"].to_numpy(), [1.0, 1.0, 1.0, np.nan, 0.0, 1.0, np.nan, 1.0]
    )
    # several meters never share a period
    two = pd.concat([frame.assign(meter_id="a"), frame.assign(meter_id="b")])
    both = EventTarget("value", ">", 3.0, "sum", horizon=3).labels(two)
    np.testing.assert_array_equal(both["event"].to_numpy(), expected + expected)
    with pytest.raises(InputError, match="humidity"):
        EventTarget("humidity", ">", 1.0).labels(frame)


# --------------------------------------------------------------------------- metrics


def test_metrics_on_known_numbers() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.0, 0.0])
    p = np.array([0.9, 0.6, 0.4, 0.2, 0.1])
    m = event_metrics(y, p, threshold=0.5)
    assert m["n"] == 5 and m["events"] == 2 and m["base_rate"] == pytest.approx(0.4)
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.04 + 0.01) / 5)
    assert m["roc_auc"] == pytest.approx(5 / 6)  # 5 of the 6 (event, non-event) pairs ranked right
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    expected_ll = -np.mean(np.log([0.9, 0.4, 0.4, 0.8, 0.9]))
    assert m["log_loss"] == pytest.approx(expected_ll)
    # the best F1 flags the top three (F1 = 0.8): halfway between 0.4 and 0.2
    assert best_f1_threshold(y, p) == pytest.approx(0.3)
    assert event_metrics(y, p, best_f1_threshold(y, p))["f1"] == pytest.approx(0.8)
    # a constant probability ranks nothing; flagging everything is its best F1
    flat = np.full(5, 0.4)
    assert event_metrics(y, flat)["roc_auc"] == pytest.approx(0.5)
    assert best_f1_threshold(y, flat) == 0.0
    assert event_metrics(y, flat, 0.0)["f1"] == pytest.approx(2 * 0.4 / 1.4)
    assert event_metrics(np.zeros(3), np.full(3, 0.1))["roc_auc"] is None
    assert best_f1_threshold(np.zeros(3), np.full(3, 0.1)) == 0.5
    assert event_metrics(np.zeros(0), np.zeros(0))["brier"] is None


# --------------------------------------------------------------------------- model


def test_no_leakage_for_the_horizon() -> None:
    frame = _rainy()
    target = EventTarget("precipitation", ">", 1.0, horizon="3d")
    model = EventForecaster(target=target, features=SPEC, seed=1).fit(frame)
    assert model.steps_ == 3 and model.booster_ is not None
    when = pd.Timestamp("2023-10-01", tz="UTC")
    step = pd.Timedelta("1D")
    anchor = when - 3 * step
    base = model.predict_proba(frame, start=when, end=when + step)["probability"].iloc[0]
    # anything after the anchor t - h (value, covariates, the event column) cannot matter
    tampered = frame.copy()
    later = tampered["ts"] > anchor
    for col in ("value", "precipitation", "humidity"):
        tampered.loc[later, col] = 1e6
    same = model.predict_proba(tampered, start=when, end=when + step)["probability"].iloc[0]
    assert same == base
    truncated = frame[frame["ts"] <= anchor]
    ahead = model.forecast(truncated)
    assert ahead["ts"].tolist() == [when]
    assert ahead["probability"].iloc[0] == pytest.approx(base)
    # ... while the data at the anchor does (the test is not vacuous)
    moved = frame.copy()
    moved.loc[moved["ts"] == anchor, "humidity"] += 40
    moved.loc[moved["ts"] == anchor, "precipitation"] += 20
    assert model.predict_proba(moved, start=when, end=when + step)["probability"].iloc[0] != base


def test_model_conventions() -> None:
    frame = _rainy(days=240)
    target = EventTarget.parse("precipitation>1", horizon=1)
    model = EventForecaster(target=target, features=SPEC, n_estimators=80, seed=3)
    twin = model.clone()
    assert not twin.is_fitted and twin.get_params() == model.get_params()
    before = frame.copy()
    a = model.fit(frame).predict(frame)
    pd.testing.assert_frame_equal(frame, before)  # input not mutated
    b = twin.fit(frame).predict(frame)
    pd.testing.assert_frame_equal(a, b)  # same seed, same output
    assert a.columns.tolist() == ["meter_id", "ts", "probability", "alert"]
    assert a["probability"].between(0, 1).all()
    assert 0 <= model.threshold_ <= 1 and 0 < model.base_rate_ < 1
    assert len(model.validation_) > 30 and model.calibration_start_ is not None
    restored = pickle.loads(pickle.dumps(model))  # noqa: S301 - our own object
    pd.testing.assert_frame_equal(restored.predict(frame), a)
    with pytest.raises(ConfigError, match="known covariate"):
        EventForecaster(target=target, features=FeatureSpec(known_covariates=("precipitation",)))
    with pytest.raises(ConfigError):
        EventForecaster(target=target, calibration="beta")
    # one class only: the base rate, no crash
    dry = frame.assign(precipitation=0.0)
    flat = EventForecaster(target=target, features=SPEC).fit(dry).predict_proba(dry)
    assert (flat["probability"] == 0.0).all()


def test_backtest_same_points_and_baselines() -> None:
    frame = _rainy()
    target = EventTarget.parse("precipitation>1", horizon="1d")
    doc, preds = backtest_events(frame, target, folds=2, features=SPEC, params={"n_estimators": 80})
    assert set(doc["models"]) == {"gbm", "climatology", "persistence"}
    assert len({m["n"] for m in doc["models"].values()}) == 1  # judged on the same points
    assert doc["models"]["climatology"]["roc_auc"] == pytest.approx(0.5)
    assert tuple(preds.columns) == EVENT_PREDICTION_COLUMNS
    # persistence at t is the observed event of the period ending at t - h
    pers = preds[preds["model"] == "persistence"].set_index("ts")
    shifted = pers["event"].shift(1).dropna()
    np.testing.assert_array_equal(pers.loc[shifted.index, "probability"], shifted)
    # climatology is the training base rate of each fold
    for fold in doc["folds"]:
        clim = preds[
            (preds["model"] == "climatology") & (preds["ts"] == pd.Timestamp(fold["origin"]))
        ]
        assert clim["probability"].iloc[0] == pytest.approx(fold["base_rate"])
        train = frame[frame["ts"] < pd.Timestamp(fold["origin"])]
        assert fold["base_rate"] == pytest.approx((train["precipitation"] > 1).mean())


def test_cli_events_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "weather.csv"
    frame = _rainy(days=300).drop(columns="meter_id")
    frame.rename(columns={"ts": "day", "value": "temp"}).to_csv(path, index=False)
    preds = tmp_path / "p.csv"
    result = CliRunner().invoke(
        _cli(),
        [
            "events",
            str(path),
            "--ts-col",
            "day",
            "--value-col",
            "temp",
            "--target",
            "precipitation>1",
            "--horizon",
            "1d",
            "--folds",
            "2",
            "--format",
            "json",
            "--predictions",
            str(preds),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["horizon_steps"] == 1 and doc["freq"] == "1d"
    assert doc["target"]["column"] == "precipitation"
    assert set(doc["models"]) == {"gbm", "climatology", "persistence"}
    written = pd.read_csv(preds)
    assert written.columns.tolist() == list(EVENT_PREDICTION_COLUMNS)
    assert set(written["model"]) == {"gbm", "climatology", "persistence"}
    # the value column itself as the event, and a clear error for an unknown column
    common = ["events", str(path), "--ts-col", "day", "--value-col", "temp"]
    result = CliRunner().invoke(
        _cli(), [*common, "--target", "temp>12", "--test-start", "2023-09-01"]
    )
    assert result.exit_code == 0, result.output
    assert "sum(temp over the next 1)" in result.stdout
    result = CliRunner().invoke(_cli(), [*common, "--target", "snow>1"])
    assert isinstance(result.exception, InputError) and "snow" in str(result.exception)


@pytest.mark.slow
def test_model_beats_climatology_on_seattle_rain_tomorrow(tmp_path: Path) -> None:
    vega = pytest.importorskip("vega_datasets")
    dataset = vega.data.seattle_weather
    assert dataset.is_local  # bundled in the package, never downloaded
    path = tmp_path / "seattle-weather.csv"
    pd.read_csv(dataset.filepath).to_csv(path, index=False)  # date,precipitation,...,weather
    result = CliRunner().invoke(
        _cli(),
        [
            "events",
            str(path),
            "--ts-col",
            "date",
            "--value-col",
            "precipitation",
            "--meter-id",
            "seattle",
            "--target",
            "precipitation>1",
            "--horizon",
            "1d",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    model, clim, pers = (doc["models"][k] for k in ("gbm", "climatology", "persistence"))
    assert model["n"] >= 400
    assert model["brier"] < 0.9 * clim["brier"]
    assert model["roc_auc"] > 0.7 > clim["roc_auc"]
    assert model["brier"] < pers["brier"] and model["roc_auc"] > pers["roc_auc"]
    assert model["f1"] > clim["f1"]
