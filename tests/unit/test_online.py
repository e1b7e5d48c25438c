"""The online forecaster: prequential accuracy, determinism, checkpoints, awkward streams."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from meterops.datasets import uci_household_hourly
from meterops.errors import ConfigError
from meterops.features import FeatureSpec, FeatureState
from meterops.models.online import DEFAULT_ONLINE_FEATURES, OnlineForecaster, _StreamState
from meterops.sources.simulator import FleetSpec, FleetStream

SPEC = FeatureSpec(
    freq="1h",
    recent_lags=3,
    seasonal_periods=("1d", "7d"),
    seasonal_lags=1,
    seasonal_means=0,
    rolling_windows=("1d", "7d"),
    calendar="cyclic",
)


def _fleet_batches(meters: int = 6, days: int = 10, seed: int = 0) -> list[pd.DataFrame]:
    stream = FleetStream(FleetSpec(meters=meters, periods=days * 24, seed=seed))
    return [stream.next_batch(1) for _ in range(days * 24)]


def _series(values: np.ndarray, meter: str, start: str = "2024-01-01") -> pd.DataFrame:
    ts = pd.date_range(start, periods=len(values), freq="h", tz="UTC")
    return pd.DataFrame({"meter_id": meter, "ts": ts, "value": values})


def test_prequential_beats_persistence_on_real_data() -> None:
    frame = uci_household_hourly().iloc[: 24 * 120]
    batches = [frame.iloc[i : i + 24] for i in range(0, len(frame), 24)]
    scores = OnlineForecaster(features=SPEC).prequential(batches, warmup=7)
    last = scores[-1]
    assert len(scores) == 120
    assert last["cum_rmse"] is not None and last["cum_persistence_rmse"] is not None
    assert last["cum_rmse"] < 0.95 * last["cum_persistence_rmse"]
    assert all(s["cum_rmse"] is None for s in scores[:7])
    assert {"n", "rmse", "mae", "persistence_rmse", "cum_mae"} <= set(last)


def test_same_seed_same_output_and_clone_is_untrained() -> None:
    batches = _fleet_batches()
    a = OnlineForecaster(features=SPEC, seed=3)
    b = a.clone()
    assert not b.is_fitted and b.get_params() == a.get_params()
    out_a = [a.predict_learn_many(x) for x in batches]
    out_b = [b.predict_learn_many(x) for x in batches]
    np.testing.assert_array_equal(np.concatenate(out_a), np.concatenate(out_b))
    assert a.ready
    assert "OnlineForecaster(horizon=1" in repr(a)


def _to_json(state: dict[str, Any]) -> str:
    return json.dumps(state, default=lambda a: a.tolist())


@pytest.mark.parametrize("through_json", [False, True])
def test_state_dict_round_trip_gives_identical_predictions(through_json: bool) -> None:
    batches = _fleet_batches()
    model = OnlineForecaster(features=SPEC, learning_rate=1e-3)
    for x in batches[:150]:
        model.learn_many(x)
    state = model.state_dict()
    restored = OnlineForecaster.from_state(json.loads(_to_json(state)) if through_json else state)
    assert restored.get_params() == model.get_params()
    for x in batches[150:170]:
        np.testing.assert_array_equal(model.predict_learn_many(x), restored.predict_learn_many(x))
    untrained = OnlineForecaster.from_state(json.loads(_to_json(OnlineForecaster().state_dict())))
    assert not untrained.is_fitted


def test_predict_before_learning_is_finite_persistence() -> None:
    batches = _fleet_batches(meters=3, days=2)
    model = OnlineForecaster(features=SPEC)
    first = model.predict_many(batches[0])  # no history at all
    assert np.isfinite(first).all()
    frame = pd.concat(batches[:30])
    fresh = OnlineForecaster(features=SPEC)
    yhat = fresh.predict_many(frame)
    assert np.isfinite(yhat).all()
    # persistence where the previous reading is known: every meter's row at t equals y[t-1]
    prev = frame.groupby("meter_id")["value"].shift(1).to_numpy()
    known = ~np.isnan(prev)
    np.testing.assert_allclose(yhat[known], prev[known])


def test_missing_values_new_meters_and_constant_series() -> None:
    rng = np.random.default_rng(0)
    n = 24 * 12
    noisy = 5 + np.sin(np.arange(n) / 3) + rng.normal(0, 0.2, n)
    noisy[rng.random(n) < 0.2] = np.nan  # 20 % missing
    noisy[100:130] = np.nan  # a long gap
    noisy[200] = np.inf  # non-finite reading
    parts = [
        _series(noisy, "gappy"),
        _series(np.full(n, 3.0), "constant"),
        _series(np.zeros(n), "zero"),
        _series(np.full(n // 2, 7.0) + rng.normal(0, 0.1, n // 2), "late", "2024-01-07"),
    ]
    frame = pd.concat(parts).sort_values(["ts", "meter_id"], kind="stable")
    frame["temperature"] = 10.0
    frame.loc[frame["meter_id"] == "gappy", "temperature"] = np.nan  # covariate missing
    steps = [g for _, g in frame.groupby("ts", sort=True)]
    model = OnlineForecaster(features=SPEC, learning_rate=1e-3)
    scores = model.prequential(steps)
    assert model.ready
    for s in scores:
        if s["n"]:
            assert s["rmse"] is not None and np.isfinite(s["rmse"])
    tail = pd.concat(steps[-24:])
    yhat = model.predict_many(tail)
    assert np.isfinite(yhat).all()
    const = (tail["meter_id"] == "constant").to_numpy()
    np.testing.assert_allclose(yhat[const], 3.0, atol=0.02)
    zero = (tail["meter_id"] == "zero").to_numpy()
    np.testing.assert_allclose(yhat[zero], 0.0, atol=1e-4)
    # a meter never seen before mid-stream, and a batch with every value missing
    unseen = _series(np.array([np.nan, np.nan]), "brand-new", "2024-01-12")
    assert np.isfinite(model.predict_learn_many(unseen)).all()


def test_spikes_do_not_make_it_diverge() -> None:
    rng = np.random.default_rng(1)
    n = 24 * 20
    values = 2 + np.sin(np.arange(n) * 2 * np.pi / 24) + rng.normal(0, 0.1, n)
    values[rng.choice(n, 12, replace=False)] = 1e6  # absurd spikes
    frame = _series(values, "m")
    batches = [frame.iloc[i : i + 24] for i in range(0, n, 24)]
    model = OnlineForecaster(features=SPEC)
    scores = model.prequential(batches)
    assert np.isfinite(model.coef_).all()
    assert all(s["rmse"] is None or np.isfinite(s["rmse"]) for s in scores)
    # once the spikes have left the 7-day window, forecasts are back on the clean level
    clean = _series(2 + np.sin(np.arange(24 * 9) * 2 * np.pi / 24), "m", "2024-01-21")
    after = model.prequential([clean.iloc[i : i + 24] for i in range(0, len(clean), 24)])
    assert after[-1]["rmse"] is not None and after[-1]["rmse"] < 0.5


def test_vectorised_update_matches_feature_state() -> None:
    rng = np.random.default_rng(2)
    ts = pd.date_range("2024-01-01", periods=320, freq="h", tz="UTC")
    freq = pd.Timedelta("1h")
    ref = FeatureState(SPEC, freq, 1, ("temperature",), origin=ts[0])
    fast = _StreamState(SPEC, freq, 1, ("temperature",))
    fast.origin = ts[0]
    for start in range(0, 320, 40):  # chunks in time order, shuffled inside, duplicates, gaps
        n = 60
        part = pd.DataFrame(
            {
                "meter_id": rng.choice(["a", "b", "c"], n),
                "ts": ts[start + rng.integers(0, 40, n)],
                "value": rng.normal(size=n),
                "temperature": rng.normal(size=n),
            }
        )
        part.loc[rng.random(n) < 0.1, "value"] = np.nan
        ref.update(part)
        ns = part["ts"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")
        data = part[["value", "temperature"]].to_numpy(np.float64)
        fast.update_arrays(part["meter_id"].to_numpy(object), ns.view(np.int64), data)
    # the next forecasts (the reference's shorter buffer holds everything they read)
    ids = np.repeat(["a", "b", "c", "zz"], 2)
    targets = pd.Series(np.tile(pd.DatetimeIndex([ts[-1], ts[-1] + freq]), 4))
    expected = ref.features(ids, targets, 1)
    assert expected["season7d_0"].notna().any()
    pd.testing.assert_frame_equal(expected, fast.features(ids, targets, 1))


def test_frequency_needed_for_one_step_batches_and_bad_params() -> None:
    spec = FeatureSpec(seasonal_periods=(), rolling_windows=(), calendar="none")
    with pytest.raises(ConfigError, match="freq"):
        OnlineForecaster(features=spec).predict_many(_fleet_batches(3, 1)[0])
    with pytest.raises(ConfigError):
        OnlineForecaster(learning_rate=0.0)
    assert OnlineForecaster().spec == DEFAULT_ONLINE_FEATURES
