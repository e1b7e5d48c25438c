"""Meter clustering by normalised daily profile."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from meterops.errors import ConfigError, InputError
from meterops.models.clustering import cluster_meters, daily_profiles
from meterops.sources.simulator import FleetSpec, simulate


def test_recovers_simulated_archetypes() -> None:
    sim = simulate(FleetSpec(meters=30, periods=24 * 14, seed=4))
    clusters = cluster_meters(sim.readings.drop(columns="label"), seed=0)
    truth = sim.meters.set_index("meter_id")["archetype"]
    assert adjusted_rand_score(truth[clusters.index], clusters) >= 0.6


def test_profiles_are_scale_free() -> None:
    ts = pd.date_range("2024-01-01", periods=48, freq="h", tz="UTC")
    base = 1.0 + np.sin(np.arange(48) * 2 * np.pi / 24)
    frame = pd.concat(
        [
            pd.DataFrame({"meter_id": "a", "ts": ts, "value": base + 1}),
            pd.DataFrame({"meter_id": "b", "ts": ts, "value": (base + 1) * 100}),
        ]
    )
    shapes = daily_profiles(frame)
    assert shapes.shape == (2, 24)
    np.testing.assert_allclose(shapes.loc["a"], shapes.loc["b"])
    assert shapes.mean(axis=1).round(9).tolist() == [1.0, 1.0]


def test_given_k_and_edge_cases() -> None:
    sim = simulate(FleetSpec(meters=6, periods=48, seed=1))
    frame = sim.readings.drop(columns="label")
    assert cluster_meters(frame, k=2).nunique() == 2
    one = frame[frame["meter_id"] == "m-0001"]
    assert cluster_meters(one).tolist() == [0]
    with pytest.raises(ConfigError):
        cluster_meters(frame, k=0)
    with pytest.raises(InputError):
        cluster_meters(frame.assign(value=np.nan))
