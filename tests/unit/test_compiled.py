"""Compiled tree inference (lleaves): same numbers as LightGBM, cached by model, never blocking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meterops.models.compiled import CompiledBoosters, compile_booster, cores_reserved
from meterops.models.gbm import GBMForecaster
from meterops.settings import ScoringSettings
from meterops.stream import ChampionScorer, LoadedModel
from meterops.types import ReadingBatch
from tests.unit.test_stream import SPEC, fleet, positions

pytest.importorskip("lleaves")


@pytest.fixture(scope="module")
def model() -> GBMForecaster:
    return GBMForecaster(horizons=(1, 24), features=SPEC, n_estimators=30, seed=0).fit(fleet())


def test_a_compiled_booster_predicts_what_lightgbm_predicts_including_missing_values(
    model: GBMForecaster, tmp_path: Path
) -> None:
    booster = model.boosters_[1]["q90"]
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, size=(5000, booster.num_feature())).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan  # missing lags take LightGBM's default branches
    expected = booster.predict(x)
    predict = compile_booster(booster, tmp_path)
    np.testing.assert_allclose(predict(x), expected, rtol=1e-12, atol=1e-12)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert [p.endswith(".so") for p in cached].count(True) == 1
    # a second compile of the same model loads the cached library (same numbers)
    again = compile_booster(booster, tmp_path)
    np.testing.assert_allclose(again(x), expected, rtol=1e-12, atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == cached


def test_the_scorer_serves_compiled_boosters_once_ready_with_the_same_forecasts(
    model: GBMForecaster, tmp_path: Path
) -> None:
    loaded = LoadedModel(1, "meterops-forecaster/1", model)
    stream = fleet(days=3, seed=1)
    stream["ts"] += pd.Timedelta("30D")
    sources, offsets = positions(len(stream))
    batch = ReadingBatch.from_pandas(stream)
    plain = ChampionScorer(loaded, ScoringSettings())
    fast = ChampionScorer(loaded, ScoringSettings(), compiled_dir=tmp_path)
    assert fast.compiled is not None and fast.compiled.wait(120)
    assert all(fast.compiled.get(g) is not None for g in fast.served.values())
    a, sa = plain.score(batch, sources, offsets, 0)
    b, sb = fast.score(batch, sources, offsets, 0)
    for column in ("yhat", "q10", "q50", "q90"):
        np.testing.assert_allclose(b.column(column), a.column(column), rtol=1e-9)
    np.testing.assert_allclose(sb.column("score"), sa.column("score"), rtol=1e-9, atol=1e-12)


def test_a_failed_compile_leaves_lightgbm_serving(model: GBMForecaster, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    compiled = CompiledBoosters({1: model.boosters_[1]}, blocked)
    assert compiled.wait(60)
    assert compiled.get(1) is None


def test_reserved_cores_leave_compiled_scoring_fewer_threads_with_the_same_numbers(
    model: GBMForecaster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lleaves

    jobs: list[int] = []
    real = lleaves.Model.predict

    def predict(self: lleaves.Model, x: np.ndarray, n_jobs: int = 1) -> np.ndarray:
        jobs.append(n_jobs)
        return real(self, x, n_jobs=n_jobs)

    monkeypatch.setattr(lleaves.Model, "predict", predict)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    booster = model.boosters_[24]["yhat"]
    x = np.random.default_rng(1).normal(size=(30_000, booster.num_feature())).astype(np.float32)
    fast = compile_booster(booster, tmp_path)
    free = fast(x)
    with cores_reserved(1):
        with cores_reserved(1):  # two writers: two cores
            twice = fast(x)
        once = fast(x)
    after = fast(x)
    with cores_reserved(8):  # never below one thread
        floor = fast(x)
    assert jobs == [4, 2, 3, 4, 1]
    for out in (twice, once, after, floor):
        np.testing.assert_array_equal(out, free)
