"""Stream scoring with an online champion: same rows as the GBM scorer, frozen model."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pandas as pd
import pytest

from meterops.errors import ConfigError
from meterops.models.baselines import Persistence
from meterops.models.online import OnlineForecaster
from meterops.settings import ScoringSettings
from meterops.stream import LoadedModel
from meterops.stream_online import OnlineChampionScorer, make_scorer
from meterops.types import PREDICTION_SCHEMA, SCORE_SCHEMA, ReadingBatch
from tests.unit.test_stream import SPEC, fleet, positions

TRAIN_DAYS = 20


class Stored:
    """A store's recent readings (``RecentReadings.get``) over a fixed frame, no forecasts."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame

    def get(self, meters: list[str], start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
        f = self.frame
        keep = f["meter_id"].isin(meters) & (f["ts"] >= start) & (f["ts"] < end)
        return f[keep].sort_values(["meter_id", "ts"]).reset_index(drop=True)

    def scores(self, meters: list[str], start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
        return pd.DataFrame()  # nothing scored before: residual scales start empty


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    return fleet(meters=5, days=TRAIN_DAYS + 3, seed=11)


@pytest.fixture(scope="module")
def champion(data: pd.DataFrame) -> LoadedModel:
    train = data[data["ts"] < data["ts"].min() + pd.Timedelta(days=TRAIN_DAYS)]
    model = OnlineForecaster(features=SPEC).fit(train)
    assert model.ready
    return LoadedModel(4, "meterops-forecaster/4", model)


def _stream(data: pd.DataFrame) -> pd.DataFrame:
    later = data[data["ts"] >= data["ts"].min() + pd.Timedelta(days=TRAIN_DAYS)]
    return later.sort_values(["ts", "meter_id"]).reset_index(drop=True)


def _scored(
    champion: LoadedModel, data: pd.DataFrame, stream: pd.DataFrame, cut: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predictions and scores of ``stream`` in batches of ``cut`` rows (one batch if None)."""
    scorer = OnlineChampionScorer(champion, ScoringSettings(horizons=("1", "24h")))
    stored = Stored(data[data["ts"] < stream["ts"].min()])
    sources, offsets = positions(len(stream))
    step = cut or len(stream)
    preds, scores = [], []
    for lo in range(0, len(stream), step):
        batch = ReadingBatch.from_pandas(stream.iloc[lo : lo + step])
        scorer.prime(stored, batch)  # type: ignore[arg-type]
        p, s = scorer.score(batch, sources[lo : lo + step], offsets[lo : lo + step], 5)
        assert p.schema == PREDICTION_SCHEMA and s.schema == SCORE_SCHEMA
        preds.append(p.to_pandas())
        scores.append(s.to_pandas())
    return pd.concat(preds, ignore_index=True), pd.concat(scores, ignore_index=True)


def test_forecasts_the_horizons_it_serves_and_scores_every_reading(
    champion: LoadedModel, data: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    stream = _stream(data)
    with caplog.at_level(logging.WARNING, logger="meterops.stream"):
        preds, scores = _scored(champion, data, stream)
    assert "horizon 24h (24 steps) skipped" in caplog.text  # a 1-step model
    assert len(preds) == len(scores) == len(stream)
    assert set(preds["horizon"]) == {1} and set(preds["model"]) == {champion.label}
    assert (preds["target_ts"] - preds["ts"] == pd.Timedelta("1h")).all()
    assert sorted(preds["offset"]) == list(range(len(stream))) and set(preds["scored_at"]) == {5}
    assert preds[["yhat", "q10", "q50", "q90"]].notna().all().all()
    assert (preds["q10"] <= preds["q50"]).all() and (preds["q50"] <= preds["q90"]).all()
    assert (preds["q90"] > preds["q10"]).all()
    assert scores["score"].between(0, 1).all() and scores["is_anomaly"].mean() < 0.01
    # the forecasts are the champion's own: a frozen copy predicting the stream gives them
    frozen = copy.deepcopy(champion.model)
    assert isinstance(frozen, OnlineForecaster)
    expected = frozen.predict_many(stream)
    np.testing.assert_allclose(scores["expected"], expected, rtol=1e-9)
    key = pd.MultiIndex.from_frame(stream[["meter_id", "ts"]])
    issued = preds.set_index(["meter_id", "target_ts"])["yhat"]
    reused = issued.reindex(key).to_numpy()  # the forecast for t issued at t - 1
    known = np.isfinite(reused)
    assert known.sum() > 0.9 * len(stream)
    np.testing.assert_allclose(reused[known], scores["expected"].to_numpy()[known], rtol=1e-9)


def test_the_champion_does_not_learn_and_batches_of_any_size_give_the_same_numbers(
    champion: LoadedModel, data: pd.DataFrame
) -> None:
    model = champion.model
    assert isinstance(model, OnlineForecaster)
    before = (model.coef_.copy(), model.rows_seen_, model.learned_)
    stream = _stream(data)
    whole_p, whole_s = _scored(champion, data, stream)
    parts_p, parts_s = _scored(champion, data, stream, cut=37)
    np.testing.assert_array_equal(model.coef_, before[0])
    assert (model.rows_seen_, model.learned_) == before[1:]
    key = ["meter_id", "ts", "horizon"]
    a = whole_p.sort_values(key).reset_index(drop=True)
    b = parts_p.sort_values(key).reset_index(drop=True)
    assert (a[key] == b[key]).all().all()
    np.testing.assert_allclose(b[["yhat", "q10", "q50", "q90"]], a[["yhat", "q10", "q50", "q90"]])
    np.testing.assert_allclose(parts_s["expected"], whole_s["expected"])
    np.testing.assert_allclose(parts_s["score"], whole_s["score"], atol=1e-12)


def test_no_peeking_and_a_spike_is_flagged(champion: LoadedModel, data: pd.DataFrame) -> None:
    stream = _stream(data)
    preds, scores = _scored(champion, data, stream)
    at = stream.index[(stream["meter_id"] == "m2") & (stream["ts"] == stream["ts"].iloc[-40])]
    spiked = stream.copy()
    spiked.loc[at, "value"] *= 8
    preds2, scores2 = _scored(champion, data, spiked)
    t = stream.loc[at[0], "ts"]
    before = (preds["ts"] < t).to_numpy()
    np.testing.assert_array_equal(preds2.loc[before, "yhat"], preds.loc[before, "yhat"])
    upto = (scores["ts"] <= t).to_numpy()  # the spike's own forecast is made before it
    np.testing.assert_array_equal(scores2.loc[upto, "expected"], scores.loc[upto, "expected"])
    changed = preds2["yhat"].to_numpy() != preds["yhat"].to_numpy()
    assert changed[(preds["meter_id"] == "m2").to_numpy() & ~before].any()  # later ones read it
    assert bool(scores2.loc[at[0], "is_anomaly"]) and scores2.loc[at[0], "score"] > 0.99
    assert not scores.loc[at[0], "is_anomaly"]


def test_a_longer_horizon_model_serves_shorter_horizons_from_older_data(
    data: pd.DataFrame,
) -> None:
    train = data[data["ts"] < data["ts"].min() + pd.Timedelta(days=TRAIN_DAYS)]
    day = OnlineForecaster(horizon=24, features=SPEC).fit(train)
    loaded = LoadedModel(5, "m/5", day)
    preds, _ = _scored(loaded, data, _stream(data))
    assert sorted(preds["horizon"].unique()) == [1, 24]
    one, full = preds[preds["horizon"] == 1], preds[preds["horizon"] == 24]
    # both read the data up to target - 24 h: the 1-step forecast for t + 1 issued at t
    # is the 24-step one issued 23 hours earlier
    early = full.set_index(["meter_id", "target_ts"])["yhat"]
    same = early.reindex(pd.MultiIndex.from_frame(one[["meter_id", "target_ts"]])).to_numpy()
    found = np.isfinite(same)
    assert found.sum() > len(one) // 2
    np.testing.assert_allclose(one["yhat"].to_numpy()[found], same[found], rtol=1e-9)


def test_only_fitted_online_models_are_served() -> None:
    model = Persistence(freq="1h").fit(fleet(meters=2, days=5))
    with pytest.raises(ConfigError, match="OnlineForecaster"):
        OnlineChampionScorer(LoadedModel(3, "x/3", model), ScoringSettings())
    with pytest.raises(ConfigError, match="OnlineForecaster"):
        OnlineChampionScorer(LoadedModel(3, "x/3", OnlineForecaster()), ScoringSettings())


def test_make_scorer_picks_the_scorer_of_the_champions_family(champion: LoadedModel) -> None:
    assert isinstance(make_scorer(champion, ScoringSettings()), OnlineChampionScorer)
    other = LoadedModel(3, "x/3", Persistence(freq="1h").fit(fleet(meters=2, days=5)))
    with pytest.raises(ConfigError, match="GBMForecaster"):  # the GBM scorer's refusal
        make_scorer(other, ScoringSettings())
