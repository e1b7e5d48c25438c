"""``bench train`` on a tiny fleet: the keys are there, the numbers are sane."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from meterops.bench_train import bench_train, fleet_readings
from meterops.errors import InputError


@pytest.mark.slow
def test_bench_train_small_fleet_reports_both_sides() -> None:
    result = bench_train(5, 20, test_days=2, n_jobs=1, n_estimators=30)

    for key in ("seconds", "peak_rss_mb", "peer_seconds", "peer_peak_rss_mb"):
        assert result[key] > 0, key
    assert result["peak_rss_mb"] < 4096
    assert math.isfinite(result["rmse"]) and math.isfinite(result["peer_rmse"])
    assert result["test_points"] == 5 * 2 * 24  # every held-out slot, scored on both
    assert result["rows"] == 5 * 20 * 24
    assert set(result["trees"]) == {"yhat", "q10", "q50", "q90"}
    assert all(n >= 1 for n in result["trees"].values())
    assert result["meterops"]["metrics"]["n"] == result["peer"]["metrics"]["n"]
    # both beat a constant forecast of the test mean: the models learned the load
    frame = fleet_readings(5, 20)
    spread = float(frame[frame["ts"] >= frame["ts"].max() - pd.Timedelta("47h")]["value"].std())
    assert result["rmse"] < spread and result["peer_rmse"] < spread


def test_fleet_readings_columns() -> None:
    frame = fleet_readings(2, 1)
    assert list(frame.columns) == ["meter_id", "ts", "value", "temperature"]
    assert len(frame) == 48


def test_too_short_for_the_test_period() -> None:
    with pytest.raises(InputError, match="training"):
        bench_train(2, 10, test_days=7)
