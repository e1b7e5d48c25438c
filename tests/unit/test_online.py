"""The online forecaster: prequential accuracy, determinism, checkpoints, awkward streams."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from meterops.bench_online import RateResult, online_rate, river_rate
from meterops.datasets import uci_household_hourly
from meterops.errors import ConfigError, InputError
from meterops.features import FeatureSpec
from meterops.models import create
from meterops.models.online import DEFAULT_ONLINE_FEATURES, OnlineForecaster
from meterops.online_stream import pack_state, unpack_state
from meterops.sources.simulator import FleetSpec, FleetStream, simulate

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


@pytest.mark.slow
def test_prequential_beats_persistence_by_ten_percent_on_all_real_data() -> None:
    """The whole bundled UCI series (4 years), replayed as a stream of daily micro-batches."""
    frame = uci_household_hourly()
    batches = [frame.iloc[i : i + 24] for i in range(0, len(frame), 24)]
    last = OnlineForecaster(features=SPEC).prequential(batches, warmup=7)[-1]
    assert last["cum_rmse"] is not None and last["cum_persistence_rmse"] is not None
    assert last["cum_rmse"] <= 0.90 * last["cum_persistence_rmse"]


def test_prequential_beats_persistence_on_a_simulated_fleet() -> None:
    """Not tuned to one series: 20 simulated meters, 10-step micro-batches, from a cold start."""
    readings = simulate(FleetSpec(meters=20, periods=24 * 60, seed=0)).readings
    frame = readings.drop(columns="label").sort_values("ts", kind="stable")
    batches = [frame.iloc[i : i + 200] for i in range(0, len(frame), 200)]
    scores = OnlineForecaster(features=SPEC).prequential(batches, warmup=17)
    last = scores[-1]
    assert last["cum_rmse"] is not None and last["cum_persistence_rmse"] is not None
    assert last["cum_rmse"] <= 0.90 * last["cum_persistence_rmse"]
    # no cold-start blow-up: the first day is never far worse than persistence
    first = scores[2]
    assert first["rmse"] is not None and first["persistence_rmse"] is not None
    assert first["rmse"] <= 1.5 * first["persistence_rmse"]


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


def test_light_checkpoint_then_observe_gives_the_forecasts_of_a_model_that_never_stopped() -> None:
    batches = _fleet_batches(meters=6, days=14)
    model = OnlineForecaster(features=SPEC, learning_rate=1e-3)
    for x in batches[:200]:
        model.learn_many(x)
    light = model.state_dict(buffers=False)
    assert "values" not in light and "stats" not in light
    arrays = sum(v.nbytes for v in light.values() if isinstance(v, np.ndarray))
    assert arrays < 16_000  # a few KB, whatever the number of meters
    restored = OnlineForecaster.from_state(unpack_state(pack_state(light)))
    assert restored.is_fitted and restored.state_.meters == []
    # a restarted worker: the recent history from the store fills the buffers, nothing is learned
    depth = restored.state_.length
    restored.observe(pd.concat(batches[200 - depth - 1 : 200]))
    np.testing.assert_array_equal(restored.coef_, model.coef_)
    for x in batches[200:260]:
        np.testing.assert_array_equal(restored.predict_learn_many(x), model.predict_learn_many(x))


def test_old_state_versions_are_refused() -> None:
    with pytest.raises(InputError, match="version"):
        OnlineForecaster.from_state({"version": 1, "params": {}})


# --------------------------------------------------------------------------- Forecaster API


def _fleet_frame(meters: int = 4, days: int = 14, seed: int = 0) -> pd.DataFrame:
    readings = simulate(FleetSpec(meters=meters, periods=24 * days, seed=seed)).readings
    return readings.drop(columns="label")


@pytest.mark.parametrize("horizon", [1, 3])
def test_predict_never_peeks(horizon: int) -> None:
    """Changing every reading after t - h changes no forecast for t, in or after the fit period."""
    frame = _fleet_frame()
    t0 = frame["ts"].min() + pd.Timedelta("10d")
    model = OnlineForecaster(horizon=horizon, features=SPEC).fit(frame[frame["ts"] < t0])
    before = model.state_dict()
    for start in (t0 - pd.Timedelta("2d"), t0):  # replay from scratch / go on from the fit
        base = model.predict(frame, horizon, start=start)
        assert len(base) == 4 * int((frame["ts"].max() - start) / pd.Timedelta("1h") + 1)
        for cutoff in (start + pd.Timedelta("5h"), start + pd.Timedelta("30h")):
            poisoned = frame.copy()
            late = poisoned["ts"] > cutoff
            poisoned.loc[late, "value"] = np.where(poisoned.index[late] % 3 == 0, np.nan, 1e3)
            after = model.predict(poisoned, horizon, start=start)
            safe = (base["ts"] <= cutoff + horizon * pd.Timedelta("1h")).to_numpy()
            pd.testing.assert_frame_equal(after[safe], base[safe])
            assert not np.allclose(after["yhat"][~safe], base["yhat"][~safe])  # it does read
    # predicting changed nothing in the fitted model
    for key in ("xtx", "coef", "values", "stats"):
        np.testing.assert_array_equal(model.state_dict()[key], before[key])


def test_forecaster_api_intervals_and_other_horizons() -> None:
    frame = _fleet_frame(meters=6, days=28, seed=4)
    t0 = frame["ts"].min() + pd.Timedelta("21d")
    model = create("online", horizons=(1,), features=FeatureSpec(freq="1h")).fit(
        frame[frame["ts"] < t0]
    )
    assert isinstance(model, OnlineForecaster) and model.spec.calendar == "cyclic"
    pred = model.predict(frame, 1, start=t0)
    assert list(pred.columns) == ["meter_id", "ts", "yhat", "q10", "q50", "q90"]
    truth = frame.set_index(["meter_id", "ts"])["value"]
    y = truth.reindex(pd.MultiIndex.from_frame(pred[["meter_id", "ts"]])).to_numpy()
    ok = np.isfinite(y)
    inside = (y[ok] >= pred["q10"].to_numpy()[ok]) & (y[ok] <= pred["q90"].to_numpy()[ok])
    assert 0.65 <= inside.mean() <= 0.95
    assert (pred["q10"] <= pred["q50"]).all() and (pred["q50"] <= pred["q90"]).all()
    # a horizon the model was not fitted for: a fresh twin learns it from the frame
    other = model.predict(frame, 3, start=t0)
    assert other["yhat"].notna().all() and not np.allclose(other["yhat"], pred["yhat"])
    fc = model.forecast(frame[frame["ts"] < t0], 2)
    assert fc.groupby("meter_id").size().tolist() == [2] * 6 and fc["yhat"].notna().all()
    with pytest.raises(ConfigError, match="one horizon"):
        create("online", horizons=(1, 24))


def test_bench_online_measures_both_sides() -> None:
    pytest.importorskip("river")
    frame = _fleet_frame(meters=5, days=10)
    ours = online_rate(frame, batch_rows=50)
    assert isinstance(ours, RateResult) and ours.rows == len(frame)
    assert ours.readings_per_s > 0 and ours.rmse is not None and np.isfinite(ours.rmse)
    ref = river_rate(frame, limit_rows=200, skip_rows=24 * 5 * 8)
    assert ref.rows == 200 and ref.rmse is not None and ref.scored > 100
    assert ref.feature_seconds is not None and 0 < ref.feature_seconds < ref.seconds
    assert set(ref.to_dict()) >= {"readings_per_s", "rows", "rmse"}


def test_frequency_needed_for_one_step_batches_and_bad_params() -> None:
    spec = FeatureSpec(seasonal_periods=(), rolling_windows=(), calendar="none")
    with pytest.raises(ConfigError, match="freq"):
        OnlineForecaster(features=spec).predict_many(_fleet_batches(3, 1)[0])
    with pytest.raises(ConfigError):
        OnlineForecaster(learning_rate=0.0)
    assert OnlineForecaster().spec == DEFAULT_ONLINE_FEATURES
