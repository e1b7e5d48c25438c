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


def test_gbm_features_in_chunks_and_trimmed_history_give_the_same_forecasts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory savers (meter chunks, history trimmed to what features read) change no number."""
    import meterops.models.gbm as gbm_module

    frame = _fleet(meters=4, days=21)
    start = frame["ts"].max() - pd.Timedelta("3d")
    train = frame[frame["ts"] < start]
    whole = GBMForecaster(horizons=(1, 24), **FAST_GBM).fit(train)
    expected = {h: whole.predict(frame, h, start=start) for h in (1, 24)}
    monkeypatch.setattr(gbm_module, "_CHUNK_ROWS", 300)  # ~1 meter per chunk
    chunked = GBMForecaster(horizons=(1, 24), **FAST_GBM).fit(train)
    assert chunked.shifts_ == whole.shifts_
    for h in (1, 24):
        pd.testing.assert_frame_equal(chunked.predict(frame, h, start=start), expected[h])
        pd.testing.assert_frame_equal(chunked.validation_[h], whole.validation_[h])
    # without trimming the history before ``start``: the same numbers
    monkeypatch.setattr(gbm_module, "_recent", lambda df, start, depth: df)
    pd.testing.assert_frame_equal(chunked.predict(frame, 24, start=start), expected[24])


def test_meter_chunks_keep_meters_whole() -> None:
    from meterops.models.gbm import _meter_chunks

    frame = _fleet(meters=5, days=2).sample(frac=1.0, random_state=0)
    parts = list(_meter_chunks(frame, 48))  # 48 readings per meter
    assert [sorted(p["meter_id"].unique()) for p in parts] == [[f"m{i}"] for i in range(5)]
    assert sum(len(p) for p in parts) == len(frame)
    pairs = list(_meter_chunks(frame, 100))
    assert [sorted(p["meter_id"].unique()) for p in pairs] == [["m0", "m1"], ["m2", "m3"], ["m4"]]
    assert [len(p) for p in list(_meter_chunks(frame, 30))] == [48] * 5  # never splits a meter
    assert next(iter(_meter_chunks(frame, 10_000))) is frame  # small frames: one part, no copy


def test_history_trim_keeps_each_meters_last_older_reading() -> None:
    from meterops.models.gbm import _recent

    frame = _fleet(meters=2, days=3)
    gap = (frame["meter_id"] == "m1") & (frame["ts"] >= "2024-01-02") & (frame["ts"] < "2024-01-03")
    frame = frame[~gap]
    start = pd.Timestamp("2024-01-03", tz="UTC")
    kept = _recent(frame, start, pd.Timedelta("6h"))
    m0 = kept[kept["meter_id"] == "m0"]["ts"]
    m1 = kept[kept["meter_id"] == "m1"]["ts"]
    assert m0.min() == start - pd.Timedelta("7h")  # the last reading before the cut
    assert len(m0) == 24 + 7
    assert m1.min() == pd.Timestamp("2024-01-01 23:00", tz="UTC")  # before its gap
    assert len(m1) == 24 + 1


def test_conformal_quantile_has_the_finite_sample_rank() -> None:
    from meterops.models.gbm import _conformal_quantile

    scores = np.arange(1.0, 20.0)  # n = 19: (n + 1) * 0.9 = 18, (n + 1) * 0.1 = 2
    assert _conformal_quantile(scores, 0.9) == 18.0
    assert _conformal_quantile(scores, 0.1) == 2.0
    assert _conformal_quantile(scores, 0.5) == 10.0
    assert _conformal_quantile(np.arange(1.0, 5.0), 0.9) == 4.0  # rank capped at n
    # a new score from the same distribution falls below the 0.9 bound >= 90 % of the time
    rng = np.random.default_rng(0)
    hits = [rng.normal() <= _conformal_quantile(rng.normal(size=9), 0.9) for _ in range(4000)]
    assert np.mean(hits) >= 0.89


def test_hold_out_covers_a_full_cycle_when_the_history_allows() -> None:
    day = pd.Timedelta("1d").value
    model = GBMForecaster()
    assert model._calibration_share(365 * day) == 0.2  # one year: 20 %
    assert model._calibration_share(729 * day) == 0.2
    assert model._calibration_share(730 * day) == pytest.approx(0.5)  # two years: one of them
    assert model._calibration_share(1000 * day) == pytest.approx(0.365)
    assert model._calibration_share(20 * 365 * day) == 0.2  # 20 % is already more
    assert GBMForecaster(calibration_cycle=None)._calibration_share(1000 * day) == 0.2
    assert GBMForecaster(calibration_fraction=0.0)._calibration_share(1000 * day) == 0.0
    with pytest.raises(ConfigError, match="calibration_cycle"):
        GBMForecaster(calibration_cycle="a year")


def test_row_buffer_appends_without_holding_rows_twice() -> None:
    from meterops.models.gbm import _Buffer

    buffer = _Buffer(4, 2, np.float32)
    buffer.add(np.ones((3, 2)))
    first = buffer.view()
    assert first.shape == (3, 2) and first.dtype == np.float32
    buffer.add(np.full((1, 2), 2.0))
    assert np.shares_memory(buffer.view(), first)  # within capacity: no copy
    buffer.add(np.full((3, 2), 3.0))  # beyond capacity: grows once, keeps the rows
    assert buffer.view().tolist() == [[1.0, 1.0]] * 3 + [[2.0, 2.0]] + [[3.0, 3.0]] * 3
    flat = _Buffer(0, 0, np.int64)
    flat.add(np.arange(5))
    assert flat.view().tolist() == [0, 1, 2, 3, 4]
