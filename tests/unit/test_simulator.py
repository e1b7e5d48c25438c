"""The fleet simulator: realistic readings, labelled anomalies, stream = batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meterops.errors import ConfigError
from meterops.sources.simulator import (
    ARCHETYPES,
    KINDS,
    FleetSpec,
    FleetStream,
    Simulation,
    simulate,
    write_ground_truth,
)

COLUMNS = ["meter_id", "ts", "value", "temperature", "label"]

# 120 meters x 90 days: about 720 anomalies, every kind many times.
SPEC = FleetSpec(meters=120, periods=24 * 90, seed=7, start=pd.Timestamp("2024-01-01", tz="UTC"))


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate(SPEC)


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    """The same fleet with no anomalies: the normal readings are identical."""
    return simulate(replace(SPEC, anomaly_rate=0.0)).readings


def _spans(sim: Simulation, kind: str) -> list[pd.DataFrame]:
    """The readings of every anomaly of ``kind``."""
    by_meter = dict(tuple(sim.readings.groupby("meter_id")))
    out = []
    for row in sim.anomalies[sim.anomalies["kind"] == kind].itertuples():
        frame = by_meter[row.meter_id]
        out.append(frame[(frame["ts"] >= row.start) & (frame["ts"] <= row.end)])
    return out


def test_readings_shape_dtypes_and_order(sim: Simulation) -> None:
    r = sim.readings
    assert list(r.columns) == COLUMNS
    assert len(r) == SPEC.meters * SPEC.periods
    assert str(r["ts"].dtype) == "datetime64[ns, UTC]"
    assert r["value"].dtype == np.float64
    assert r["temperature"].dtype == np.float64
    assert r["meter_id"].iloc[:3].tolist() == ["m-0001", "m-0002", "m-0003"]
    assert r["meter_id"].nunique() == SPEC.meters
    assert r["ts"].is_monotonic_increasing  # time order: every meter, then the next step
    assert r["ts"].iloc[0] == SPEC.start
    assert r["ts"].iloc[-1] == SPEC.start + (SPEC.periods - 1) * pd.Timedelta("1h")
    assert not r.duplicated(["meter_id", "ts"]).any()
    assert set(r["label"]) == {"", *KINDS}


def test_values_are_finite_and_non_negative(sim: Simulation) -> None:
    values = sim.readings["value"].to_numpy()
    assert np.isfinite(values).all()
    assert (values >= 0).all()


def test_same_seed_same_fleet_other_seed_differs() -> None:
    spec = FleetSpec(meters=5, periods=24 * 14, seed=3)
    a, b = simulate(spec), simulate(spec)
    pd.testing.assert_frame_equal(a.readings, b.readings)
    pd.testing.assert_frame_equal(a.anomalies, b.anomalies)
    c = simulate(replace(spec, seed=4))
    assert not np.allclose(a.readings["value"], c.readings["value"])


def test_anomalies_do_not_change_normal_readings(sim: Simulation, clean: pd.DataFrame) -> None:
    normal = (sim.readings["label"] == "").to_numpy()
    assert (clean["label"] == "").all()
    np.testing.assert_array_equal(
        sim.readings["value"].to_numpy()[normal], clean["value"].to_numpy()[normal]
    )
    np.testing.assert_array_equal(sim.readings["temperature"], clean["temperature"])


def test_anomaly_count_matches_the_rate(sim: Simulation) -> None:
    expected = SPEC.anomaly_rate * SPEC.meters * (SPEC.periods / 24) / 30  # 720
    assert 0.85 * expected < len(sim.anomalies) < 1.15 * expected
    counts = sim.anomalies["kind"].value_counts()
    assert set(counts.index) == set(KINDS)
    assert counts.min() > 0.15 * len(sim.anomalies)
    per_meter = sim.anomalies.groupby("meter_id").size()
    assert per_meter.mean() == pytest.approx(2.0 * 3, rel=0.15)


def test_ground_truth_matches_the_labels(sim: Simulation) -> None:
    a = sim.anomalies
    assert list(a.columns) == ["meter_id", "start", "end", "kind"]
    steps = ((a["end"] - a["start"]).dt.total_seconds() // 3600).astype(int) + 1
    labelled = sim.readings["label"].value_counts()
    for kind in KINDS:
        assert labelled[kind] == steps[a["kind"] == kind].sum()
    lo = {"spike": 1, "dropout": 2, "level_shift": 48, "stuck": 6}
    hi = {"spike": 1, "dropout": 12, "level_shift": 14 * 24, "stuck": 48}
    for kind in KINDS:
        mine = steps[a["kind"] == kind]
        assert mine.min() >= lo[kind]
        assert mine.max() <= hi[kind]


def test_anomalies_never_overlap_per_meter(sim: Simulation) -> None:
    a = sim.anomalies.sort_values(["meter_id", "start"])
    previous_end = a.groupby("meter_id")["end"].shift()
    gap = (a["start"] - previous_end).dropna()
    assert (gap >= pd.Timedelta("2h")).all()  # at least one normal reading between


def test_dropouts_are_zero_and_stuck_spans_constant(sim: Simulation) -> None:
    for span in _spans(sim, "dropout"):
        assert (span["value"] == 0.0).all()
        assert (span["label"] == "dropout").all()
    for span in _spans(sim, "stuck"):
        assert span["value"].nunique() == 1
        assert span["value"].iloc[0] > 0
        assert (span["label"] == "stuck").all()


def test_spikes_and_level_shifts_scale_the_normal_value(
    sim: Simulation, clean: pd.DataFrame
) -> None:
    value = sim.readings["value"].to_numpy()
    base = clean["value"].to_numpy()
    label = sim.readings["label"].to_numpy()
    spikes = label == "spike"
    assert (value[spikes] >= 3.0 * base[spikes] - 1e-12).all()
    for span in _spans(sim, "level_shift"):
        ratio = value[span.index] / base[span.index]
        assert np.allclose(ratio, ratio[0])
        assert 0.4 <= ratio[0] <= 0.6 or 1.6 <= ratio[0] <= 2.5


def test_temperature_is_a_temperate_climate() -> None:
    year = simulate(FleetSpec(meters=1, periods=24 * 366, seed=1, anomaly_rate=0.0)).readings
    temp = year.set_index("ts")["temperature"]
    assert -20 < temp.min() < 5
    assert 20 < temp.max() < 40
    monthly = temp.groupby(pd.DatetimeIndex(temp.index).month).mean()
    assert monthly[7] - monthly[1] > 8
    assert 8 < temp.mean() < 15


def test_archetypes_have_distinct_daily_shapes() -> None:
    spec = FleetSpec(meters=60, periods=24 * 28, seed=2, anomaly_rate=0.0)
    s = simulate(spec)
    assert set(s.meters["archetype"]) <= set(ARCHETYPES)
    assert list(s.meters.columns) == ["meter_id", "archetype", "base_kw"]
    r = s.readings.merge(s.meters, on="meter_id")
    hour, weekday = r["ts"].dt.hour, r["ts"].dt.weekday
    day = r[(hour >= 10) & (hour < 16) & (weekday < 5)].groupby("meter_id")["value"].mean()
    night = r[(hour >= 0) & (hour < 5)].groupby("meter_id")["value"].mean()
    ratio = (day / night).rename("ratio").to_frame().join(s.meters.set_index("meter_id"))
    by_kind = ratio.groupby("archetype")["ratio"]
    assert by_kind.min()["office"] > 1.5
    assert by_kind.max()["night_shift"] < 0.8
    assert 1.0 < by_kind.median()["residential"] < 3.5


def test_fleet_stream_equals_simulate(sim: Simulation) -> None:
    stream = FleetStream(SPEC)
    sizes = np.random.default_rng(0).integers(1, 400, size=1000)
    parts = []
    for size in sizes:
        if stream.done:
            break
        parts.append(stream.next_batch(int(size)))
    assert stream.done
    assert stream.position == SPEC.periods
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), sim.readings)
    tail = stream.next_batch(5)
    assert list(tail.columns) == COLUMNS
    assert len(tail) == 0
    assert tail.dtypes.equals(sim.readings.dtypes)


def test_fleet_stream_single_steps_at_quarter_hours() -> None:
    spec = FleetSpec(meters=4, periods=4 * 24 * 3, freq="15min", seed=5, anomaly_rate=20.0)
    stream = FleetStream(spec)
    first = stream.next_batch()
    assert len(first) == 4
    assert stream.next_batch(0).empty
    rest = [stream.next_batch() for _ in range(spec.periods - 1)]
    whole = pd.concat([first, *rest], ignore_index=True)
    pd.testing.assert_frame_equal(whole, simulate(spec).readings)
    assert (whole["ts"].diff().dropna().isin([pd.Timedelta(0), pd.Timedelta("15min")])).all()


def test_kinds_and_rate_options() -> None:
    only = simulate(FleetSpec(meters=20, periods=24 * 30, kinds=("stuck",), anomaly_rate=4.0))
    assert set(only.anomalies["kind"]) == {"stuck"}
    assert set(only.readings["label"]) == {"", "stuck"}
    none = simulate(FleetSpec(meters=3, periods=48, anomaly_rate=0.0))
    assert none.anomalies.empty
    assert list(none.anomalies.columns) == ["meter_id", "start", "end", "kind"]
    assert (none.readings["label"] == "").all()


def test_spec_validation_and_start_in_utc() -> None:
    assert FleetSpec(start=pd.Timestamp("2024-06-01 02:00")).start == pd.Timestamp(
        "2024-06-01 02:00", tz="UTC"
    )
    paris = FleetSpec(start=pd.Timestamp("2024-06-01 02:00", tz="Europe/Paris"))
    assert str(paris.start.tz) == "UTC"
    assert paris.start == pd.Timestamp("2024-06-01 00:00", tz="UTC")
    for bad in (
        {"meters": 0},
        {"periods": -1},
        {"freq": "7min"},
        {"freq": "soon"},
        {"kinds": ("spike", "meteor")},
        {"anomaly_rate": -1.0},
        {"seed": -1},
    ):
        with pytest.raises(ConfigError):
            FleetSpec(**bad)


def test_empty_fleet_period() -> None:
    s = simulate(FleetSpec(meters=2, periods=0))
    assert list(s.readings.columns) == COLUMNS
    assert s.readings.empty
    assert s.anomalies.empty


def test_write_ground_truth_round_trips(sim: Simulation, tmp_path: Path) -> None:
    path = write_ground_truth(sim, tmp_path / "truth.csv")
    back = pd.read_csv(path, parse_dates=["start", "end"])
    assert back["start"].iloc[0].tzname() == "UTC"
    assert path.read_text().splitlines()[1].split(",")[1].endswith("Z")
    pd.testing.assert_frame_equal(back, sim.anomalies, check_dtype=False)


def test_batch_is_a_reading_batch_with_temperature(sim: Simulation) -> None:
    small = Simulation(sim.readings.head(50), sim.anomalies, sim.meters)
    batch = small.batch()
    assert len(batch) == 50
    assert batch.covariates == ("temperature",)


@pytest.mark.slow
def test_thousand_meters_for_a_year() -> None:
    spec = FleetSpec(meters=1000, periods=8760, seed=11)
    s = simulate(spec)
    assert len(s.readings) == 8_760_000
    assert s.readings["meter_id"].nunique() == 1000
    expected = spec.anomaly_rate * 1000 * 365 / 30
    assert 0.9 * expected < len(s.anomalies) < 1.1 * expected
    assert set(s.readings["label"].unique()) == {"", *KINDS}
