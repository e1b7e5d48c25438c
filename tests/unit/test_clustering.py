"""Meter clustering by normalised daily profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from meterops.cli import app
from meterops.errors import ConfigError, InputError
from meterops.models.clustering import cluster_meters, daily_profiles, fit_clusters
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


def test_fit_clusters_reports_profiles_sizes_and_silhouette() -> None:
    sim = simulate(FleetSpec(meters=30, periods=24 * 14, seed=4))
    result = fit_clusters(sim.readings.drop(columns="label"), seed=0)
    assert result.k == len(result.profiles) >= 2
    assert result.silhouette is not None and 0.3 < result.silhouette <= 1.0
    assert sum(result.sizes().values()) == 30 and -1 not in result.sizes()
    assert result.profiles.shape[1] == 24
    # a profile is a mean of shapes that each average 1: it averages 1 too
    np.testing.assert_allclose(result.profiles.mean(axis=1), 1.0)
    assert result.labels.equals(cluster_meters(sim.readings.drop(columns="label"), seed=0))
    # meters of one archetype share a cluster (the simulator's truth)
    truth = sim.meters.set_index("meter_id")["archetype"]
    purity = pd.crosstab(truth[result.labels.index], result.labels).max(axis=0).sum() / 30
    assert purity >= 0.8


def test_given_k_has_a_silhouette_and_meters_without_profile_are_minus_one() -> None:
    sim = simulate(FleetSpec(meters=6, periods=48, seed=1))
    frame = sim.readings.drop(columns="label")
    # one meter only read in the morning: no full daily profile
    partial = frame["meter_id"].eq("m-0006") & (frame["ts"].dt.hour >= 12)
    result = fit_clusters(frame[~partial], k=2)
    assert result.k == 2 and result.silhouette is not None
    assert result.labels["m-0006"] == -1
    assert result.sizes()[-1] == 1 and sum(result.sizes().values()) == 6


def test_cli_cluster_on_a_file(tmp_path: Path) -> None:
    sim = simulate(FleetSpec(meters=12, periods=24 * 7, seed=2))
    path = tmp_path / "fleet.csv"
    sim.readings.drop(columns="label").to_csv(path, index=False)
    result = CliRunner().invoke(app, ["cluster", str(path), "--k", "3", "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["source"] == str(path) and doc["saved"] is False
    assert doc["k"] == 3 and doc["meters"] == doc["clustered"] == 12
    assert sorted(doc["assignments"]) == sorted(sim.meters["meter_id"])
    assert sum(c["meters"] for c in doc["clusters"]) == 12
    assert all(len(c["profile"]) == 24 and 0 <= c["peak_hour"] < 24 for c in doc["clusters"])
    table = CliRunner().invoke(app, ["cluster", str(path), "--k", "3"])
    assert table.exit_code == 0 and "12 of 12 meter(s) in 3 cluster(s)" in table.stdout
    bad = CliRunner().invoke(app, ["cluster", str(path), "--k-range", "2-8"])
    assert bad.exit_code != 0
