"""Backtests: metrics on known numbers, folds, selection, and the real-data acceptance."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from meterops.backtest import metrics, predict_as_of, run_backtest
from meterops.datasets import data_dir, uci_household_hourly
from meterops.dayahead import parse_horizon
from meterops.errors import ConfigError, InputError
from meterops.features import FeatureSpec
from meterops.models import GBMForecaster, create
from meterops.sources.simulator import FleetSpec, simulate

FAST_GBM = {"n_estimators": 40, "quantile_estimators": 40, "min_history": 50, "min_train_rows": 100}


def test_metrics_on_known_numbers() -> None:
    y = np.array([1.0, 2.0, 0.0, 4.0])
    yhat = np.array([2.0, 2.0, 0.0, 2.0])
    m = metrics(y, yhat, q10=y - 1, q50=yhat, q90=np.array([1.5, 2.5, -1.0, 3.0]))
    assert m["rmse"] == pytest.approx(np.sqrt((1 + 0 + 0 + 4) / 4))
    assert m["mae"] == pytest.approx(0.75)
    assert m["mape"] == pytest.approx((100 + 0 + 50) / 3)  # the zero actual is skipped
    assert m["smape"] == pytest.approx((2 / 3 + 0 + 0 + 2 * 2 / 6) / 4 * 100)
    assert m["coverage_80"] == pytest.approx(0.5)
    # pinball: q10 residual is always +1 -> 0.1; q50 = |err| / 2; q90 by hand
    q50 = np.mean([0.5, 0, 0, 1.0])
    q90 = (
        np.mean([0.9 * -0.5 * -1 * -1 + 0.0, 0.0, 0.9, 0.9])
        if False
        else np.mean([max(0.9 * d, -0.1 * d) for d in y - np.array([1.5, 2.5, -1.0, 3.0])])
    )
    assert m["pinball"] == pytest.approx(np.mean([0.1, q50, q90]))


def _small_fleet() -> pd.DataFrame:
    return simulate(FleetSpec(meters=3, periods=24 * 30, seed=3)).readings


def test_backtest_shape_and_same_points() -> None:
    frame = _small_fleet()
    doc, preds = run_backtest(frame, "6h", folds=2, models=["persistence", "seasonal_naive_daily"])
    assert doc["horizon_steps"] == 6 and len(doc["folds"]) == 2
    assert set(doc["models"]) == {"persistence", "seasonal_naive_daily", "selected"}
    counts = {m["n"] for m in doc["models"].values()}
    assert len(counts) == 1  # every model judged on the same points
    assert list(preds.columns) == ["meter_id", "ts", "model", "yhat", "q10", "q90"]
    assert set(preds["model"]) == {"persistence", "seasonal_naive_daily", "selected"}


def test_backtest_errors() -> None:
    frame = _small_fleet()
    with pytest.raises(ConfigError):
        run_backtest(frame, "1h", models=["nope"])
    with pytest.raises(InputError):
        run_backtest(frame, "60d", models=["persistence"])
    with pytest.raises(InputError):
        run_backtest(frame, "1h", test_start="2030-01-01", models=["persistence"])


def test_cli_backtest_json(tmp_path: Path) -> None:
    from meterops.cli_models import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keep "backtest" a sub-command
        pass

    path = tmp_path / "r.csv"
    _small_fleet().drop(columns="label").to_csv(path, index=False)
    preds = tmp_path / "p.csv"
    result = CliRunner().invoke(
        app,
        [
            "backtest",
            str(path),
            "--horizon",
            "3h",
            "--format",
            "json",
            "--folds",
            "2",
            "--models",
            "persistence,seasonal_naive_weekly",
            "--predictions",
            str(preds),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["horizon_steps"] == 3 and "selected" in doc["models"]
    assert pd.read_csv(preds).columns.tolist() == ["meter_id", "ts", "model", "yhat", "q10", "q90"]


@pytest.mark.slow
def test_gbm_beats_seasonal_naive_on_real_household() -> None:
    frame = uci_household_hourly()
    frame = frame[frame["ts"] >= frame["ts"].max() - pd.Timedelta(days=550)]
    started = time.perf_counter()
    doc, _ = run_backtest(
        frame,
        "24h",
        folds=3,
        models=["seasonal_naive_daily", "gbm"],
        features=FeatureSpec(timezone="Europe/Paris"),
    )
    assert time.perf_counter() - started < 120
    gbm, naive = doc["models"]["gbm"], doc["models"]["seasonal_naive_daily"]
    assert gbm["rmse"] <= 0.85 * naive["rmse"]
    assert 0.75 <= gbm["coverage_80"] <= 0.85
    assert doc["models"]["selected"]["rmse"] <= naive["rmse"]
    assert (data_dir() / "uci_household_power_hourly.csv.gz").is_file()


@pytest.mark.slow
def test_gbm_beats_seasonal_naive_on_simulated_fleet() -> None:
    frame = simulate(FleetSpec(meters=20, periods=24 * 120)).readings
    doc, _ = run_backtest(frame, "24h", folds=1, models=["seasonal_naive_daily", "gbm"])
    gbm, naive = doc["models"]["gbm"], doc["models"]["seasonal_naive_daily"]
    assert gbm["rmse"] < 0.85 * naive["rmse"]
    assert 0.7 <= gbm["coverage_80"] <= 0.9


# --------------------------------------------------------------------------- day-ahead


def _hourly(meters: int = 2, days: int = 30, seed: int = 0, per_hour: int = 1) -> pd.DataFrame:
    """Hourly meters with a daily shape and noise; values distinct enough to trace."""
    rng = np.random.default_rng(seed)
    step = f"{60 // per_hour}min"
    ts = pd.date_range("2024-01-01", periods=24 * per_hour * days, freq=step, tz="UTC")
    hour = ts.hour.to_numpy() + ts.minute.to_numpy() / 60
    parts = []
    for i in range(meters):
        level = 2.0 + i
        value = level * (1 + 0.5 * np.sin(2 * np.pi * hour / 24)) + rng.normal(0, 0.1, len(ts))
        parts.append(pd.DataFrame({"meter_id": f"m{i}", "ts": ts, "value": value}))
    return pd.concat(parts, ignore_index=True)


def test_day_ahead_parse_and_leads() -> None:
    da = parse_horizon("day-ahead@10:00", "Europe/Paris")
    assert da is not None and da.text == "day-ahead@10:00"
    assert parse_horizon("24h") is None and parse_horizon(3) is None
    for bad in ("day-ahead", "day-ahead@25:00", "day-ahead@10h"):
        with pytest.raises(ConfigError, match="day-ahead"):
            parse_horizon(bad)
    origin = pd.Timestamp("2024-01-01", tz="UTC")
    hour = pd.Timedelta("1h")

    def local_day(day: str) -> pd.Series:
        slots = pd.date_range(day, periods=25, freq="h", tz="Europe/Paris")
        slots = slots[slots.normalize() == slots[0].normalize()]
        return pd.Series(slots.tz_convert("UTC"))

    # a normal day: issued 10:00 the day before, slots 00:00 .. 23:00 -> 14 .. 37 h
    assert da.leads(local_day("2024-06-02"), hour, origin).tolist() == list(range(14, 38))
    # spring forward (23 h day): the issue time is still 10:00 CEST the day before
    assert da.leads(local_day("2024-03-31"), hour, origin).tolist() == [14, 15, *range(16, 37)]
    # fall back (25 h day)
    assert da.leads(local_day("2024-10-27"), hour, origin).tolist() == list(range(14, 39))
    # 15-minute data, UTC: 00:00 is 56 steps after 10:00, 23:45 is 151
    q = pd.Timedelta("15min")
    slots = pd.Series(pd.date_range("2024-01-03", periods=96, freq="15min", tz="UTC"))
    leads = parse_horizon("day-ahead@10:00").leads(slots, q, origin)  # type: ignore[union-attr]
    assert (leads[0], leads[-1]) == (56, 151)


def test_day_ahead_baselines_read_the_cutoff_values() -> None:
    frame = _hourly(meters=1, days=20)
    v = frame["value"].to_numpy()
    da = parse_horizon("day-ahead@10:00", "UTC")
    assert da is not None
    start = frame["ts"].min() + pd.Timedelta(days=15)  # midnight of day 15
    end = start + pd.Timedelta(days=1)
    persistence = create("persistence").fit(frame)
    pred = predict_as_of(persistence, frame, da, start=start, end=end)
    assert len(pred) == 24
    # every slot of day 15 gets the reading of 10:00 on day 14 (row 14 * 24 + 10)
    assert np.allclose(pred["yhat"], v[14 * 24 + 10])
    daily = create("seasonal_naive_daily").fit(frame)
    pred = predict_as_of(daily, frame, da, start=start, end=end)
    hours = np.arange(24)
    # lead <= 24 h (00:00 .. 10:00): yesterday's same hour; later slots: two days before
    expected = np.where(hours <= 10, v[14 * 24 + hours], v[13 * 24 + hours])
    assert np.allclose(pred["yhat"], expected)


@pytest.mark.parametrize("name", ["persistence", "seasonal_naive_daily", "gbm"])
def test_day_ahead_does_not_use_data_after_the_cutoff(name: str) -> None:
    frame = _hourly(meters=2, days=30)
    da = parse_horizon("day-ahead@10:00", "UTC")
    assert da is not None
    train = frame[frame["ts"] < pd.Timestamp("2024-01-25", tz="UTC")]
    extra = {"horizons": (da.text,), **FAST_GBM} if name == "gbm" else {}
    model = create(name, **extra).fit(train)
    start = pd.Timestamp("2024-01-28", tz="UTC")
    end = start + pd.Timedelta(days=1)
    cutoff = pd.Timestamp("2024-01-27 10:00", tz="UTC")
    before = predict_as_of(model, frame, da, start=start, end=end)
    assert len(before) == 48 and before["yhat"].notna().all()
    # everything after the cutoff changes (a spike, the target day itself): nothing moves
    later = frame.copy()
    after_cutoff = later["ts"] > cutoff
    later.loc[after_cutoff, "value"] = later.loc[after_cutoff, "value"] * 10 + 100
    pd.testing.assert_frame_equal(predict_as_of(model, later, da, start=start, end=end), before)
    # ... while a change at the cutoff itself does move the forecasts (the test can fail)
    at_cutoff = frame.copy()
    at_cutoff.loc[at_cutoff["ts"] == cutoff, "value"] += 50.0
    moved = predict_as_of(model, at_cutoff, da, start=start, end=end)
    assert not np.allclose(moved["yhat"], before["yhat"])


def test_gbm_day_ahead_model_has_one_booster_set_with_a_lead_feature() -> None:
    frame = _hourly(meters=3, days=30)
    model = GBMForecaster(horizons=("24h", "day-ahead@10:00"), **FAST_GBM).fit(frame)
    fitted = model.day_ahead_["day-ahead@10:00"]
    assert fitted is not None
    assert fitted.knots == tuple(range(14, 38))
    assert fitted.boosters["yhat"].feature_name()[-1] == "lead"
    assert set(fitted.boosters) == {"yhat", "q10", "q50", "q90"}
    assert fitted.validation is not None and len(fitted.validation) > 0
    # many leads (15-minute data) share at most ``day_ahead_leads`` feature horizons
    quarter = GBMForecaster(horizons=("day-ahead@10:00",), day_ahead_leads=8, **FAST_GBM)
    q = quarter.fit(_hourly(meters=1, days=30, per_hour=4))
    knots = q.day_ahead_["day-ahead@10:00"].knots  # type: ignore[union-attr]
    assert len(knots) == 8 and knots[-1] == 151 and min(knots) >= 56
    with pytest.raises(ConfigError, match="not fitted for day-ahead@06:00"):
        model.predict(frame, "day-ahead@06:00")
    # a meter unseen in training gets the fallback's day-ahead forecast, lead by lead
    new = _hourly(meters=1, days=30, seed=9).assign(meter_id="new")
    start = new["ts"].max() - pd.Timedelta("2d") + pd.Timedelta("1h")
    da = parse_horizon("day-ahead@10:00")
    assert da is not None
    served = model.predict(pd.concat([frame, new]), da.text, start=start)
    naive = predict_as_of(create("seasonal_naive_daily").fit(new), new, da, start=start)
    np.testing.assert_allclose(
        served[served["meter_id"] == "new"]["yhat"].to_numpy(), naive["yhat"].to_numpy()
    )


def test_backtest_day_ahead_document_and_predictions() -> None:
    frame = _hourly(meters=2, days=40)
    doc, preds = run_backtest(
        frame,
        "day-ahead@10:00",
        folds=2,
        models=["persistence", "seasonal_naive_daily", "gbm"],
        features=FeatureSpec(timezone="UTC"),
        gbm_params=FAST_GBM,
    )
    assert doc["horizon"] == "day-ahead@10:00"
    assert doc["day_ahead"] == {"cutoff": "10:00", "timezone": "UTC", "lead_steps": [14, 37]}
    assert doc["horizon_steps"] == 37
    assert {m["n"] for m in doc["models"].values()} == {doc["models"]["gbm"]["n"]}
    assert doc["models"]["gbm"]["n"] > 0
    # one row per target slot and model, every slot of the test folds
    per_model = preds.groupby("model").size()
    assert per_model["persistence"] == per_model["gbm"] == per_model["selected"]
    assert not preds.duplicated(["meter_id", "ts", "model"]).any()
    # the GBM learns the shape: far better than persisting the 10:00 reading
    assert doc["models"]["gbm"]["rmse"] < 0.5 * doc["models"]["persistence"]["rmse"]


def test_cli_backtest_day_ahead(tmp_path: Path) -> None:
    from meterops.cli_models import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        pass

    path = tmp_path / "r.csv"
    _hourly(meters=1, days=30).to_csv(path, index=False)
    preds = tmp_path / "p.csv"
    args = ["backtest", str(path), "--horizon", "day-ahead@10:00", "--timezone", "UTC"]
    args += ["--models", "persistence,seasonal_naive_daily", "--folds", "1"]
    result = CliRunner().invoke(app, [*args, "--format", "json", "--predictions", str(preds)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["day_ahead"]["lead_steps"] == [14, 37]
    written = pd.read_csv(preds)
    assert written.columns.tolist() == ["meter_id", "ts", "model", "yhat", "q10", "q90"]
    assert len(written) == 3 * doc["models"]["persistence"]["n"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and "leads 14..37 steps of 1h" in table.stdout


@pytest.mark.slow
def test_gbm_day_ahead_on_real_household() -> None:
    frame = uci_household_hourly()
    doc, _ = run_backtest(
        frame,
        "day-ahead@10:00",
        folds=3,
        models=["seasonal_naive_daily", "gbm"],
        features=FeatureSpec(timezone="Europe/Paris"),
    )
    gbm, naive = doc["models"]["gbm"], doc["models"]["seasonal_naive_daily"]
    assert doc["day_ahead"]["lead_steps"] == [14, 38]  # 38: the 25-hour autumn day
    assert gbm["rmse"] <= 0.85 * naive["rmse"]
    assert 0.75 <= gbm["coverage_80"] <= 0.85


@pytest.mark.slow
def test_interval_coverage_on_the_whole_household_history() -> None:
    """The acceptance command's data: more than two years, so the hold-out is a full year."""
    frame = uci_household_hourly()
    doc, _ = run_backtest(
        frame,
        "24h",
        folds=3,
        models=["seasonal_naive_daily", "gbm"],
        features=FeatureSpec(timezone="Europe/Paris"),
    )
    gbm, naive = doc["models"]["gbm"], doc["models"]["seasonal_naive_daily"]
    assert gbm["rmse"] <= 0.85 * naive["rmse"]
    assert 0.78 <= gbm["coverage_80"] <= 0.84
    assert all(0.75 <= fold["coverage_80"] <= 0.85 for fold in doc["per_fold"]["gbm"])
