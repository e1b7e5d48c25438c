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

from meterops.backtest import metrics, run_backtest
from meterops.datasets import data_dir, uci_household_hourly
from meterops.errors import ConfigError, InputError
from meterops.features import FeatureSpec
from meterops.sources.simulator import FleetSpec, simulate


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
