"""Stream scoring: the champion's forecasts per reading, anomaly scores, online learners."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from meterops.features import FeatureSpec
from meterops.models.baselines import Persistence
from meterops.models.gbm import GBMForecaster
from meterops.online_stream import OnlineLearners, pack_state, unpack_state
from meterops.pipeline import Pipeline
from meterops.settings import ScoringSettings, Settings
from meterops.store.base import RecentReadings, Scored, Store
from meterops.stream import ChampionScorer, LoadedModel, ResidualScale
from meterops.types import DEADLETTER_SCHEMA, PREDICTION_SCHEMA, SCORE_SCHEMA, ReadingBatch

SPEC = FeatureSpec(freq="1h", rolling_windows=("1d",), seasonal_periods=("1d",))


def _recent(store: Store) -> RecentReadings:
    """Every stored reading is recent (the learners' warm-up reads what it needs)."""
    return RecentReadings(
        store, pd.Timestamp("2000-01-01", tz="UTC"), pd.Timestamp("2100-01-01", tz="UTC")
    )


def fleet(meters: int = 6, days: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-01-01", periods=days * 24, freq="h", tz="UTC")
    hour = ts.hour.to_numpy()
    parts = []
    for i in range(meters):
        level = 1.0 + i
        daily = level * (1 + 0.5 * np.sin(2 * np.pi * (hour - 6) / 24))
        parts.append(
            pd.DataFrame(
                {
                    "meter_id": f"m{i}",
                    "ts": ts,
                    "value": daily + rng.normal(0, 0.05 * level, len(ts)),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def champion() -> LoadedModel:
    train = fleet()
    model = GBMForecaster(horizons=(1, 24), features=SPEC, n_estimators=60, seed=0).fit(train)
    return LoadedModel(1, "meterops-forecaster/1", model)


def positions(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, "readings/0"), np.arange(n, dtype=np.int64)


def test_scores_every_reading_for_each_horizon_with_lineage(champion: LoadedModel) -> None:
    stream = fleet(days=3, seed=1)
    stream["ts"] += pd.Timedelta("30D")
    scorer = ChampionScorer(champion, ScoringSettings(horizons=("1", "24h")))
    sources, offsets = positions(len(stream))
    preds, scores = scorer.score(ReadingBatch.from_pandas(stream), sources, offsets, now_us=7)
    p = preds.to_pandas()
    assert len(p) == 2 * len(stream) and len(scores) == len(stream)
    assert sorted(p["horizon"].unique()) == [1, 24]
    assert (p["target_ts"] - p["ts"] == pd.to_timedelta(p["horizon"], unit="h")).all()
    assert set(p["model"]) == {"meterops-forecaster/1"} and set(p["scored_at"]) == {7}
    assert sorted(p.loc[p["horizon"] == 1, "offset"]) == list(offsets)
    late = p[p["ts"] >= p["ts"].min() + pd.Timedelta("1D")]  # full feature windows
    assert late[["yhat", "q10", "q50", "q90"]].notna().all().all()
    assert (late["q10"] <= late["q50"]).all() and (late["q50"] <= late["q90"]).all()


def test_batches_of_any_size_give_the_same_numbers(champion: LoadedModel) -> None:
    stream = fleet(days=4, seed=2)
    stream["ts"] += pd.Timedelta("30D")
    stream = stream.sort_values(["ts", "meter_id"]).reset_index(drop=True)
    sources, offsets = positions(len(stream))
    whole = ChampionScorer(champion, ScoringSettings())
    one_go, one_go_scores = (
        t.to_pandas() for t in whole.score(ReadingBatch.from_pandas(stream), sources, offsets, 0)
    )
    pieces = ChampionScorer(champion, ScoringSettings())
    parts, score_parts = [], []
    for lo in range(0, len(stream), 37):
        chunk = stream.iloc[lo : lo + 37]
        out = pieces.score(
            ReadingBatch.from_pandas(chunk), sources[lo : lo + 37], offsets[lo : lo + 37], 0
        )
        parts.append(out[0].to_pandas())
        score_parts.append(out[1].to_pandas())
    chunked = pd.concat(parts, ignore_index=True)
    # the one-step forecast judging each reading: reused or recomputed, the same numbers
    scores = pd.concat(score_parts, ignore_index=True)
    np.testing.assert_allclose(scores["expected"], one_go_scores["expected"], rtol=1e-6)
    np.testing.assert_allclose(scores["score"], one_go_scores["score"], rtol=1e-6, atol=1e-9)
    direct = ChampionScorer(champion, ScoringSettings(horizons=("24h",)))  # no reuse possible
    _, direct_scores = direct.score(ReadingBatch.from_pandas(stream), sources, offsets, 0)
    np.testing.assert_allclose(
        direct_scores.column("expected").to_numpy(), one_go_scores["expected"], rtol=1e-6
    )
    key = ["meter_id", "ts", "horizon"]
    a = one_go.sort_values(key).reset_index(drop=True)
    b = chunked.sort_values(key).reset_index(drop=True)
    assert (a[key] == b[key]).all().all()
    np.testing.assert_allclose(b[["yhat", "q10", "q90"]], a[["yhat", "q10", "q90"]], rtol=1e-6)


def test_a_spike_is_flagged_and_normal_readings_are_not(champion: LoadedModel) -> None:
    stream = fleet(days=3, seed=3)
    stream["ts"] += pd.Timedelta("30D")
    spike = stream.index[(stream["meter_id"] == "m2") & (stream["ts"] == stream["ts"].max())]
    stream.loc[spike, "value"] *= 8
    scorer = ChampionScorer(champion, ScoringSettings(anomaly_threshold=4.0))
    sources, offsets = positions(len(stream))
    _, scores = scorer.score(ReadingBatch.from_pandas(stream), sources, offsets, 0)
    s = scores.to_pandas()
    assert bool(s.loc[spike[0], "is_anomaly"])
    assert s.loc[spike[0], "score"] > 0.99
    rest = s.drop(index=spike)
    assert rest["is_anomaly"].mean() < 0.01
    finite = rest["score"].dropna()
    assert len(finite) > 0.9 * len(rest) and finite.between(0, 1).all()


def test_a_meter_noisier_than_the_fleet_is_judged_on_its_own_residuals(
    champion: LoadedModel,
) -> None:
    """An unseen, noisy meter: without its own scale one reading in many is flagged."""
    rng = np.random.default_rng(4)
    stream = fleet(meters=1, days=14, seed=4)
    stream["meter_id"] = "unseen"
    stream["ts"] += pd.Timedelta("30D")
    stream["value"] += rng.normal(0, 0.4, len(stream))  # eight times the fleet's noise
    spike = stream.index[-30]
    stream.loc[spike, "value"] += 6.0
    sources, offsets = positions(len(stream))
    batch = ReadingBatch.from_pandas(stream)
    fixed = ChampionScorer(champion, ScoringSettings(noise_window=0))
    _, plain = fixed.score(batch, sources, offsets, 0)
    own = ChampionScorer(champion, ScoringSettings(noise_window=168))
    _, scaled = own.score(batch, sources, offsets, 0)
    later = np.arange(len(stream)) >= 7 * 24  # once a week of residuals is known
    plain_rate = plain.column("is_anomaly").to_numpy()[later].mean()
    scaled_flags = scaled.column("is_anomaly").to_numpy()
    assert plain_rate > 0.05
    assert scaled_flags[later].mean() < 0.02
    assert scaled_flags[spike]  # a real spike still stands out


def _coverage(predictions: pa.Table, stream: pd.DataFrame, after: pd.Timestamp) -> dict[int, float]:
    """Per horizon, the share of later readings inside the 80 % interval issued for them."""
    p = predictions.to_pandas()
    actual = stream.rename(columns={"ts": "target_ts", "value": "y"})
    m = p.merge(actual, on=["meter_id", "target_ts"])
    m = m[m["ts"] >= after]
    inside = (m["y"] >= m["q10"]) & (m["y"] <= m["q90"])
    return {int(h): float(v) for h, v in inside.groupby(m["horizon"]).mean().items()}


def test_intervals_widen_for_a_meter_that_misses_them_and_stay_for_a_calibrated_one(
    champion: LoadedModel,
) -> None:
    """The unseen noisy meter's 80 % intervals cover about 80 % once its misses are
    clear; the fleet's meters, calibrated, keep the model's intervals exactly."""
    rng = np.random.default_rng(6)
    noisy = fleet(meters=1, days=14, seed=6)
    noisy["meter_id"] = "unseen"
    noisy["value"] += rng.normal(0, 0.4, len(noisy))
    calm = fleet(days=14, seed=7)
    stream = pd.concat([noisy, calm], ignore_index=True)
    stream["ts"] += pd.Timedelta("30D")
    stream = stream.sort_values(["ts", "meter_id"], kind="stable").reset_index(drop=True)
    sources, offsets = positions(len(stream))
    batch = ReadingBatch.from_pandas(stream)
    plain, _ = ChampionScorer(champion, ScoringSettings(noise_window=0)).score(
        batch, sources, offsets, 0
    )
    own, _ = ChampionScorer(champion, ScoringSettings(noise_window=168)).score(
        batch, sources, offsets, 0
    )
    after = stream["ts"].min() + pd.Timedelta("7D")
    is_noisy = stream["meter_id"] == "unseen"
    before = _coverage(plain, stream[is_noisy], after)
    widened = _coverage(own, stream[is_noisy], after)
    assert max(before.values()) < 0.45
    assert all(0.7 <= v <= 0.92 for v in widened.values()), widened
    # the calibrated meters: identical predictions, and about 80 % coverage
    kept = own.filter(pc.not_equal(own.column("meter_id"), "unseen"))
    model = plain.filter(pc.not_equal(plain.column("meter_id"), "unseen"))
    assert kept.equals(model)
    assert all(0.7 <= v <= 0.9 for v in _coverage(kept, stream[~is_noisy], after).values())


def test_residual_scales_depend_on_earlier_readings_only_not_on_batches() -> None:
    rng = np.random.default_rng(5)
    ids = np.array(["a", "b", "a", "c", "b", "a"] * 50)
    z = rng.normal(0, 2, len(ids))
    z[7] = np.nan  # no usable interval: not in the window
    whole = ResidualScale(window=20, cap=4.0, prior=5).apply(ids, z)
    pieces = ResidualScale(window=20, cap=4.0, prior=5)
    chunked = np.concatenate([pieces.apply(ids[i : i + 7], z[i : i + 7]) for i in range(0, 300, 7)])
    np.testing.assert_allclose(chunked, whole)
    for i in (0, 40, 299):  # the naive definition
        earlier = [
            min(v * v, 16.0) for j, v in enumerate(z[:i]) if ids[j] == ids[i] and np.isfinite(v)
        ]
        window = earlier[-20:]
        expected = np.sqrt(max(1.0, (sum(window) + 5) / (len(window) + 5)))
        assert whole[i] == pytest.approx(expected)
        # intervals widen by the same scale only when the meter clearly misses them
        misses = [v > 1.2815515655446004**2 for v in window]  # squared (capped) z kept
        n = len(window) + 5
        rate = (sum(misses) + 0.2 * 5) / n
        clearly = rate - 2 * np.sqrt(rate * (1 - rate) / n) > 0.2
        widen = ResidualScale(window=20, cap=4.0, prior=5).scales(ids[: i + 1], z[: i + 1])[1]
        assert widen[-1] == pytest.approx(expected if clearly else 1.0)
    # primed from stored residuals: the same as having seen them
    primed = ResidualScale(window=20, cap=4.0, prior=5)
    primed.prime(ids[:150], z[:150])
    np.testing.assert_allclose(primed.apply(ids[150:], z[150:]), whole[150:])


def test_only_gbm_champions_score_in_the_stream() -> None:
    model = Persistence(freq="1h").fit(fleet(meters=2, days=5))
    with pytest.raises(Exception, match="GBMForecaster"):
        ChampionScorer(LoadedModel(3, "x/3", model), ScoringSettings())


def test_checkpoint_bytes_round_trip_without_pickle() -> None:
    state = {"a": np.arange(5.0), "meta": {"k": [1, 2]}, "x": 3.5, "s": "text"}
    back = unpack_state(pack_state(state))
    np.testing.assert_array_equal(back["a"], state["a"])
    assert back["meta"] == {"k": [1, 2]} and back["x"] == 3.5 and back["s"] == "text"


def _write(store: Store, frame: pd.DataFrame, metrics: pa.Table, checkpoints: list[Any]) -> None:
    good = ReadingBatch.from_pandas(frame)
    origins = pa.table({"source": ["readings/0"] * len(frame), "offset": np.arange(len(frame))})
    scored = Scored(
        PREDICTION_SCHEMA.empty_table(), SCORE_SCHEMA.empty_table(), metrics, checkpoints
    )
    store.write(good, DEADLETTER_SCHEMA.empty_table(), {}, origins, scored)


def test_online_learners_learn_each_message_once_and_resume_from_their_checkpoint(
    settings: Settings,
) -> None:
    data = fleet(meters=4, days=12, seed=5).sort_values(["ts", "meter_id"], ignore_index=True)
    cut = data["ts"].min() + pd.Timedelta("9D")
    first, second = data[data["ts"] < cut], data[data["ts"] >= cut]
    sources = np.full(len(first), "readings/0")
    with Pipeline(settings) as pipe:
        learners = OnlineLearners(pipe.store, "g")
        metrics, checkpoints = learners.step(
            first, sources, np.full(len(first), 10), 0, _recent(pipe.store)
        )
        assert metrics.num_rows == 1 and metrics.column("n")[0].as_py() > 0.9 * len(first)
        _write(pipe.store, first, metrics, checkpoints)
        # the same message again (crash before the bus commit): nothing learned twice
        again, kept = learners.step(first, sources, np.full(len(first), 10), 0, _recent(pipe.store))
        assert again.num_rows == 0 and kept == []
        uninterrupted = learners.step(
            second, sources[: len(second)], np.full(len(second), 20), 0, _recent(pipe.store)
        )
        # a new worker: learned state from the checkpoint, buffers from the store
        restarted = OnlineLearners(pipe.store, "g")
        resumed = restarted.step(
            second, sources[: len(second)], np.full(len(second), 20), 0, _recent(pipe.store)
        )
        assert pipe.store.checkpoint("online/g/readings/0") is not None
    a, b = uninterrupted[0].to_pylist()[0], resumed[0].to_pylist()[0]
    assert a["n"] == b["n"] > 0
    assert b["sse"] == pytest.approx(a["sse"], rel=1e-9)
    assert b["sse"] < b["persistence_sse"]  # it learned something a fresh model would not


def test_online_learners_wait_when_a_batch_cannot_tell_the_frequency(settings: Settings) -> None:
    one_each = fleet(meters=3, days=1, seed=6).groupby("meter_id").head(1)
    with Pipeline(settings) as pipe:
        learners = OnlineLearners(pipe.store, "g")
        sources = np.full(len(one_each), "readings/0")
        metrics, checkpoints = learners.step(
            one_each, sources, np.full(len(one_each), 3), 0, _recent(pipe.store)
        )
    assert metrics.num_rows == 0 and checkpoints == []
