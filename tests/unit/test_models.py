"""Forecasters: baselines exact, conformance of every model, fallbacks and errors."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pandas as pd
import pytest

from meterops.errors import ConfigError, InputError
from meterops.models import MODEL_NAMES, Forecaster, GBMForecaster, create
from meterops.models.baselines import Persistence, SeasonalNaive

FAST_GBM = {"n_estimators": 40, "min_history": 50, "min_train_rows": 100}


def _fleet(meters: int = 3, days: int = 21, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-01-01", periods=24 * days, freq="h", tz="UTC")
    hour = ts.hour.to_numpy()
    parts = []
    for i in range(meters):
        level = 1.0 + 3 * i
        v = level * (1 + 0.5 * np.sin(2 * np.pi * hour / 24)) + rng.normal(0, 0.1 * level, len(ts))
        parts.append(
            pd.DataFrame(
                {
                    "meter_id": f"m{i}",
                    "ts": ts,
                    "value": v,
                    "temperature": rng.normal(8, 2, len(ts)),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _model(name: str, seed: int = 0) -> Forecaster:
    extra = FAST_GBM if name == "gbm" else {}
    return create(name, horizons=(3,), seed=seed, **extra)


def test_persistence_and_seasonal_naive_are_exact() -> None:
    ts = pd.date_range("2024-01-01", periods=24 * 8, freq="h", tz="UTC")
    v = np.arange(len(ts), dtype=float)
    frame = pd.DataFrame({"meter_id": "m", "ts": ts, "value": v})
    p = Persistence().fit(frame).predict(frame, 2)
    assert np.array_equal(p["yhat"].to_numpy()[2:], v[:-2])
    d = SeasonalNaive(period="1d").fit(frame).predict(frame, 3)
    assert np.array_equal(d["yhat"].to_numpy()[24:], v[:-24])
    d30 = SeasonalNaive(period="1d").fit(frame).predict(frame, 30)
    assert np.array_equal(d30["yhat"].to_numpy()[48:], v[:-48])
    w = SeasonalNaive(period="7d").fit(frame).predict(frame, "24h")
    assert np.array_equal(w["yhat"].to_numpy()[168:], v[:-168])
    # residuals are constant here: intervals collapse onto the forecast + residual
    assert np.allclose(p["q90"].to_numpy()[2:] - p["yhat"].to_numpy()[2:], 2.0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_conformance(name: str) -> None:
    frame = _fleet()
    before = frame.copy()
    model = _model(name)
    twin = model.clone()
    assert twin.get_params() == model.get_params() and not twin.is_fitted
    model.fit(frame)
    pd.testing.assert_frame_equal(frame, before)  # input not mutated
    assert not twin.is_fitted
    again = _model(name).fit(frame)
    start = frame["ts"].max() - pd.Timedelta("2d")
    a = model.predict(frame, 3, start=start)
    b = again.predict(frame, 3, start=start)
    pd.testing.assert_frame_equal(a, b)  # same seed, same output
    assert list(a.columns) == ["meter_id", "ts", "yhat", "q10", "q50", "q90"]
    assert (a["q10"] <= a["q50"]).all() and (a["q50"] <= a["q90"]).all()
    fc = model.forecast(frame, 3)
    assert fc.groupby("meter_id").size().tolist() == [3, 3, 3]  # length = horizon
    assert fc["yhat"].notna().all()
    # copes with a covariate missing
    partial = model.predict(frame.drop(columns="temperature"), 3, start=start)
    assert partial["yhat"].notna().all()
    restored = pickle.loads(pickle.dumps(model))  # noqa: S301 - our own object
    pd.testing.assert_frame_equal(restored.predict(frame, 3, start=start), a)


def test_gbm_falls_back_for_short_history(caplog: pytest.LogCaptureFixture) -> None:
    frame = _fleet()
    short = frame[
        (frame["meter_id"] == "m0") & (frame["ts"] >= frame["ts"].max() - pd.Timedelta("1d"))
    ]
    data = pd.concat([frame[frame["meter_id"] != "m0"], short], ignore_index=True)
    with caplog.at_level(logging.WARNING, logger="meterops.models"):
        model = GBMForecaster(horizons=(1,), **FAST_GBM).fit(data)
        pred = model.predict(data, 1, start=data["ts"].max() - pd.Timedelta("6h"))
    assert "m0" in caplog.text and "baseline" in caplog.text
    assert pred[pred["meter_id"] == "m0"]["yhat"].notna().all()


def test_constant_and_all_missing_series() -> None:
    frame = _fleet()
    frame.loc[frame["meter_id"] == "m1", "value"] = 5.0
    frame.loc[frame["meter_id"] == "m2", "value"] = np.nan
    for name in MODEL_NAMES:
        model = _model(name).fit(frame)
        pred = model.predict(frame, 3, start=frame["ts"].max() - pd.Timedelta("1d"))
        const = pred[pred["meter_id"] == "m1"]
        assert np.allclose(const["yhat"], 5.0, rtol=1e-3), name
        assert pred[pred["meter_id"] == "m2"]["yhat"].isna().all(), name


def test_horizon_longer_than_history_is_an_input_error() -> None:
    frame = _fleet(days=1)
    for name in MODEL_NAMES:
        with pytest.raises(InputError, match="longer than the history"):
            create(name, horizons=("2d",)).fit(frame) if name == "gbm" else _fit_and_forecast(
                name, frame
            )


def _fit_and_forecast(name: str, frame: pd.DataFrame) -> None:
    from meterops.features import regularize
    from meterops.models.base import check_history

    create(name).fit(frame)
    check_history(regularize(frame, pd.Timedelta("1h")), 48)


def test_gbm_rejects_unfitted_horizon() -> None:
    model = GBMForecaster(horizons=(2,), **FAST_GBM).fit(_fleet())
    with pytest.raises(ConfigError, match="fitted for horizons"):
        model.predict(_fleet(), 5)
