"""Merging per-partition online learners: the model one learner fed every meter would be."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meterops.errors import InputError
from meterops.features import FeatureSpec
from meterops.models.online import OnlineForecaster
from meterops.registry import load_forecaster, save_forecaster

SPEC = FeatureSpec(
    freq="1h",
    recent_lags=3,
    seasonal_periods=("1d",),
    seasonal_lags=1,
    seasonal_means=0,
    rolling_windows=("1d",),
    calendar="cyclic",
)
DAYS, TRAIN_DAYS = 20, 18


def partitions(seed: int = 0) -> list[pd.DataFrame]:
    """Four partitions of three meters each, with different dynamics per partition.

    Partition ``p`` has its own daily amplitude, phase and noise persistence
    (AR coefficient), so each learner alone learns different coefficients.
    """
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-01-01", periods=DAYS * 24, freq="h", tz="UTC")
    hour = ts.hour.to_numpy()
    out = []
    for p, (ar, amp) in enumerate([(0.0, 0.8), (0.5, 0.4), (0.8, 0.1), (0.95, 0.0)]):
        rows = []
        for i in range(3):
            level = 1.0 + 3 * p + i
            noise = rng.normal(0, 0.1 * level, len(ts))
            e = np.zeros(len(ts))
            for t in range(1, len(ts)):
                e[t] = ar * e[t - 1] + noise[t]
            v = level * (1 + amp * np.sin(2 * np.pi * (hour - 6 - 3 * p) / 24)) + e
            rows.append(pd.DataFrame({"meter_id": f"p{p}m{i}", "ts": ts, "value": v}))
        out.append(pd.concat(rows, ignore_index=True))
    return out


def learn(frame: pd.DataFrame, **params: object) -> OnlineForecaster:
    """A learner fed ``frame``'s training days in daily micro-batches, as the stream would."""
    model = OnlineForecaster(features=SPEC, **params)  # type: ignore[arg-type]
    train = frame[frame["ts"] < frame["ts"].min() + pd.Timedelta(days=TRAIN_DAYS)]
    for _, batch in train.groupby(train["ts"].dt.floor("1D")):
        model.learn_many(batch)
    return model


@pytest.fixture(scope="module")
def fleet() -> tuple[pd.DataFrame, OnlineForecaster, list[OnlineForecaster]]:
    parts = partitions()
    everything = pd.concat(parts, ignore_index=True)
    return everything, learn(everything), [learn(p) for p in parts]


def _forecasts(model: OnlineForecaster, frame: pd.DataFrame) -> pd.DataFrame:
    cut = frame["ts"].min() + pd.Timedelta(days=TRAIN_DAYS)
    return model.predict(frame, 1, start=cut).sort_values(["meter_id", "ts"], ignore_index=True)


def test_merged_learners_forecast_like_one_learner_fed_every_meter(
    fleet: tuple[pd.DataFrame, OnlineForecaster, list[OnlineForecaster]],
) -> None:
    frame, single, learners = fleet
    merged = OnlineForecaster.merge(learners)
    # the persistence prior is counted once: the fleet's steps, not k times them
    assert merged.steps_ == pytest.approx(single.steps_, rel=1e-6)
    assert sum(m.steps_ for m in learners) > 3.9 * single.steps_
    assert merged.rows_seen_ == single.rows_seen_ == sum(m.rows_seen_ for m in learners)
    assert merged.learned_ == single.learned_ and merged.origin_ == single.origin_
    scale = np.abs(single.coef_).max()
    merged_gap = np.abs(merged.coef_ - single.coef_).max() / scale
    naive = np.mean([m.coef_ for m in learners], axis=0)  # averaging the coefficients
    naive_gap = np.abs(naive - single.coef_).max() / scale
    assert merged_gap < 0.01 and naive_gap > 10 * merged_gap

    want = _forecasts(single, frame)
    got = _forecasts(merged, frame)
    assert (got[["meter_id", "ts"]] == want[["meter_id", "ts"]]).all().all()
    spread = (want["q90"] - want["q10"]).mean()
    assert np.abs(got["yhat"] - want["yhat"]).mean() < 0.001 * spread
    # intervals come from the learners' own past errors (each its partition's model):
    # close to, not exactly, those of the single model
    gap = np.abs(got[["q10", "q90"]].to_numpy() - want[["q10", "q90"]].to_numpy())
    assert gap.mean() < 0.02 * spread
    # averaging what each learner forecasts is clearly further off
    each = [_forecasts(m, frame)["yhat"].to_numpy() for m in learners]
    averaged = np.abs(np.mean(each, axis=0) - want["yhat"].to_numpy()).mean()
    assert averaged > 20 * np.abs(got["yhat"] - want["yhat"]).mean()


def test_merge_is_order_free_round_trips_and_of_one_is_that_one(
    fleet: tuple[pd.DataFrame, OnlineForecaster, list[OnlineForecaster]], tmp_path: Path
) -> None:
    frame, _, learners = fleet
    merged = OnlineForecaster.merge(learners)
    backwards = OnlineForecaster.merge(learners[::-1])
    np.testing.assert_allclose(backwards.coef_, merged.coef_, rtol=1e-9, atol=1e-10)
    want = _forecasts(merged, frame)
    stored = load_forecaster(save_forecaster(merged, tmp_path / "merged"))
    assert isinstance(stored, OnlineForecaster)
    pd.testing.assert_frame_equal(_forecasts(stored, frame), want)
    light = OnlineForecaster.from_state(merged.state_dict(buffers=False))
    pd.testing.assert_frame_equal(_forecasts(light, frame), want)
    alone = OnlineForecaster.merge(learners[:1])
    np.testing.assert_allclose(alone.coef_, learners[0].coef_, rtol=1e-9, atol=1e-10)
    pd.testing.assert_frame_equal(_forecasts(alone, frame), _forecasts(learners[0], frame))
    assert learners[0].rows_seen_ == alone.rows_seen_  # the inputs are not changed


def test_learners_that_describe_different_features_are_refused(
    fleet: tuple[pd.DataFrame, OnlineForecaster, list[OnlineForecaster]],
) -> None:
    frame, _, learners = fleet
    part = frame[frame["meter_id"].str.startswith("p0")]
    other_rate = learn(part, learning_rate=1e-4)
    with pytest.raises(InputError, match="hyper-parameters"):
        OnlineForecaster.merge([learners[0], other_rate])
    daily = OnlineForecaster(horizon=24, features=SPEC).fit(part)
    with pytest.raises(InputError, match="horizon"):
        OnlineForecaster.merge([learners[0], daily])
    warm = learn(part.assign(temperature=20.0))
    with pytest.raises(InputError, match="covariates"):
        OnlineForecaster.merge([learners[0], warm])
    shifted = learn(part.assign(ts=part["ts"] + pd.Timedelta("30min")))
    with pytest.raises(InputError, match="grid phase"):
        OnlineForecaster.merge([learners[0], shifted])
    with pytest.raises(InputError, match="learned nothing"):
        OnlineForecaster.merge([learners[0], OnlineForecaster(features=SPEC)])
    with pytest.raises(InputError, match="no online models"):
        OnlineForecaster.merge([])
    hourly = dataclasses.replace(SPEC, freq="30min")
    halves = OnlineForecaster(features=hourly).fit(part)
    with pytest.raises(InputError, match=r"hyper-parameters|frequency"):
        OnlineForecaster.merge([learners[0], halves])
