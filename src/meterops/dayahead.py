"""Day-ahead horizons: every day at a local cutoff, forecast every slot of the next local day.

A horizon written ``day-ahead@HH:MM`` (e.g. ``day-ahead@10:00``) means: on
each local day ``D - 1`` of the configured time zone, at ``HH:MM`` local time
(the *issue time*), forecast every grid slot of the local day ``D``, each
from the readings at ``<=`` the issue time only. The lead time of a slot is
the number of data steps from the last grid slot at or before the issue time
(the *anchor*) to the slot, so it varies within the day: 14 .. 37 steps for
hourly data with a 10:00 cutoff (13 .. 38 around a daylight-saving change).

The other horizon forms (steps ``1``, durations ``24h``) are resolved by
:func:`meterops.features.resolve_horizon`; :func:`parse_horizon` returns
``None`` for them.

Off-grid readings snap to the nearest slot (:func:`meterops.features.regularize`),
so a reading up to half a step after the cutoff can land in the anchor slot.
A cutoff that does not exist on a day (skipped by a daylight-saving change)
moves back to just before the gap, one that occurs twice takes the first.

>>> import pandas as pd
>>> da = parse_horizon("day-ahead@10:00", "Europe/Paris")
>>> da.text, str(da.cutoff)
('day-ahead@10:00', '10:00:00')
>>> ts = pd.Series(pd.to_datetime(["2024-06-02 00:00", "2024-06-02 23:00"]).tz_localize(
...     "Europe/Paris").tz_convert("UTC"))
>>> da.leads(ts, pd.Timedelta("1h"), pd.Timestamp("2024-01-01", tz="UTC")).tolist()
[14, 37]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError

__all__ = ["DAY_AHEAD_PREFIX", "DayAhead", "parse_horizon", "predict_by_lead"]

DAY_AHEAD_PREFIX = "day-ahead"
_PATTERN = re.compile(r"^\s*day-ahead\s*@\s*(\d{1,2}):(\d{2})\s*$", re.IGNORECASE)
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class DayAhead:
    """A day-ahead horizon: issued daily at ``cutoff`` (local time of ``timezone``)."""

    cutoff: time
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        try:
            pd.Timestamp("2024-01-01").tz_localize(self.timezone)
        except Exception as exc:  # pytz, zoneinfo and dateutil raise different types
            raise ConfigError(f"unknown time zone {self.timezone!r}") from exc

    @property
    def text(self) -> str:
        """The horizon as written on the command line, e.g. ``day-ahead@10:00``."""
        return f"{DAY_AHEAD_PREFIX}@{self.cutoff.hour:02d}:{self.cutoff.minute:02d}"

    def issue_times(self, ts: pd.Series) -> pd.Series:
        """The issue time (UTC) of the forecast of each target time in ``ts`` (UTC)."""
        local = _as_utc(ts).dt.tz_convert(self.timezone)
        day = local.dt.tz_localize(None).dt.normalize()
        wall = (
            day
            - pd.Timedelta(days=1)
            + pd.Timedelta(hours=self.cutoff.hour, minutes=self.cutoff.minute)
        )
        first = np.ones(len(wall), dtype=bool)  # an ambiguous wall time: its first occurrence
        issued = wall.dt.tz_localize(self.timezone, ambiguous=first, nonexistent="shift_backward")
        out: pd.Series = issued.dt.tz_convert("UTC")
        return out

    def leads(self, ts: pd.Series, freq: pd.Timedelta, origin: pd.Timestamp) -> Ints:
        """Steps from each target's anchor (last slot ``<=`` its issue time) to the target.

        ``ts`` are grid slots ``origin + k * freq``; every lead is at least 1.
        """
        if len(ts) == 0:
            return np.zeros(0, dtype=np.int64)
        step = int(pd.Timedelta(freq).value)
        base = pd.Timestamp(origin).tz_convert("UTC").value
        target = _ns(_as_utc(ts))
        issued = _ns(self.issue_times(ts))
        k = np.rint((target - base) / step).astype(np.int64)
        anchor = np.floor_divide(issued - base, step)
        out: Ints = np.maximum(k - anchor, 1).astype(np.int64)
        return out

    def lead_range(
        self, start: pd.Timestamp, end: pd.Timestamp, freq: pd.Timedelta, origin: pd.Timestamp
    ) -> tuple[int, int]:
        """The smallest and largest lead of the grid slots in ``[start, end]``."""
        step = pd.Timedelta(freq)
        first = pd.Timestamp(origin) + step * int(np.ceil((start - origin) / step))
        slots = pd.Series(pd.date_range(first, end, freq=step))
        if slots.empty:
            slots = pd.Series([first])
        leads = self.leads(slots, step, origin)
        return int(leads.min()), int(leads.max())


def _as_utc(ts: pd.Series) -> pd.Series:
    """``ts`` as a UTC series; tz-aware input is converted without ``to_datetime`` (which
    iterates a tz-aware series element by element to decide on caching)."""
    series = pd.Series(ts)
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        out: pd.Series = series.dt.tz_convert("UTC")
        return out
    return pd.Series(pd.to_datetime(series, utc=True))


def _ns(ts: pd.Series) -> Ints:
    out: Ints = (
        ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]").view(np.int64)
    )
    return out


def parse_horizon(horizon: Any, timezone: str = "UTC") -> DayAhead | None:
    """The :class:`DayAhead` of a ``day-ahead@HH:MM`` horizon, ``None`` for any other form.

    Raises :class:`ConfigError` for a malformed day-ahead horizon.

    >>> parse_horizon("24h") is None, parse_horizon("day-ahead@06:30").text
    (True, 'day-ahead@06:30')
    """
    if isinstance(horizon, DayAhead):
        return horizon
    if not isinstance(horizon, str) or not horizon.strip().lower().startswith(DAY_AHEAD_PREFIX):
        return None
    match = _PATTERN.match(horizon)
    if match is None:
        raise ConfigError(
            f"invalid day-ahead horizon {horizon!r}: write day-ahead@HH:MM, e.g. day-ahead@10:00"
            " (the cutoff in the local time of --timezone)"
        )
    hour, minute = int(match.group(1)), int(match.group(2))
    if hour > 23 or minute > 59:
        raise ConfigError(f"invalid day-ahead cutoff in {horizon!r}: use 00:00 .. 23:59")
    return DayAhead(cutoff=time(hour, minute), timezone=timezone)


Predict = Callable[[pd.DataFrame, int, pd.Timestamp | None, pd.Timestamp | None], pd.DataFrame]


def predict_by_lead(
    predict: Predict,
    frame: pd.DataFrame,
    day_ahead: DayAhead,
    freq: pd.Timedelta,
    origin: pd.Timestamp,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Day-ahead forecasts from any as-of ``predict(frame, steps, start, end)``.

    For each distinct lead ``L`` among the slots ``predict`` returns, the
    rows of ``predict(frame, L, ...)`` whose lead is ``L``: each slot is
    forecast from data up to its own anchor, nothing later. Returns the rows
    of ``predict`` (same columns), sorted by meter and time.
    """
    probe = predict(frame, 1, start, end)
    if probe.empty:
        return probe
    leads = day_ahead.leads(probe["ts"], freq, origin)
    parts = []
    for lead in np.unique(leads):
        pred = predict(frame, int(lead), start, end)
        keep = day_ahead.leads(pred["ts"], freq, origin) == lead
        parts.append(pred[keep])
    out: pd.DataFrame = pd.concat(parts, ignore_index=True)
    return out.sort_values(["meter_id", "ts"], kind="stable").reset_index(drop=True)
