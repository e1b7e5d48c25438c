"""The one feature definition: the same numbers in a backtest, a training job and the stream.

A forecast of horizon ``h`` steps for target time ``t`` may only use what was
known at ``t - h`` (the *anchor*): readings and past covariates at times
``<= t - h``; only calendar, holidays and covariates declared ``known`` (e.g.
a weather forecast) are read at ``t`` itself. Every feature is therefore an
*offset* from the target, and no offset that touches a reading is below ``h``:

===========================  ==================================================
feature                      definition (``y`` = value, ``a = t - h``)
===========================  ==================================================
``lag{i}``                   ``y[a - i]`` for ``i < recent_lags``
``season{P}_{j}``            ``y[t - P * (ceil(h / P) + j)]``: the same phase of
                             the period ``P`` (e.g. ``1d``, ``7d``), the most
                             recent ones a forecast at ``a`` can know
``season{P}_mean``           mean of the ``seasonal_means`` values above
``roll{W}_mean``/``_std``    mean / sample std of ``y[a - W + 1 .. a]`` (NaN skipped,
                             at least ``min_window_fraction`` of the window)
``{cov}_last``               a past covariate at ``a``; ``{cov}_roll{W}_mean`` its
                             mean over the first rolling window
``{cov}``                    a *known* covariate at ``t``
``hour``, ``dow``, ``month`` local calendar of ``t`` (``calendar="categorical"``) or
                             ``*_sin``/``*_cos`` pairs (``"cyclic"``)
``holiday``                  1.0 when the local date of ``t`` is a public holiday
===========================  ==================================================

Durations (periods, windows) are scaled to the data frequency; one shorter
than two steps is dropped (daily data has no ``1d`` season). Readings are put
on a regular grid per meter first (:func:`regularize`): off-grid timestamps
snap to the nearest slot, duplicates are averaged, gaps and non-finite values
become NaN, so missing data never crashes anything and never shifts a lag.

Two ways to compute, same numbers (a test holds them together):

* :func:`build_frame` is vectorised over many meters (training, backtests);
* :class:`FeatureState` keeps a per-meter ring of recent values and computes
  features for any ``(meter, target time)`` (the stream).

>>> import numpy as np, pandas as pd
>>> ts = pd.date_range("2024-01-01", periods=6, freq="h", tz="UTC")
>>> frame = pd.DataFrame({"meter_id": "m", "ts": ts, "value": np.arange(6.0)})
>>> spec = FeatureSpec(recent_lags=2, seasonal_periods=(), rolling_windows=(), calendar="none")
>>> build_frame(frame, spec, horizon=2)[["value", "lag0", "lag1"]].tail(2).to_numpy().tolist()
[[4.0, 2.0, 1.0], [5.0, 3.0, 2.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError, InputError
from meterops.settings import parse_duration
from meterops.types import ReadingBatch

__all__ = [
    "BASE_COLUMNS",
    "CALENDARS",
    "FeaturePlan",
    "FeatureSpec",
    "FeatureState",
    "build_frame",
    "covariate_columns",
    "infer_freq",
    "regularize",
    "resolve_horizon",
]

Floats = npt.NDArray[np.float64]
BASE_COLUMNS = ("meter_id", "ts", "value")
CALENDARS = ("categorical", "cyclic", "none")
_NOT_COVARIATES = {"meter_id", "ts", "value", "label"}


# --------------------------------------------------------------------------- helpers


def covariate_columns(frame: pd.DataFrame) -> tuple[str, ...]:
    """The numeric covariate columns of a reading frame (not ``label``, not ``_private``)."""
    return tuple(
        str(c)
        for c in frame.columns
        if str(c) not in _NOT_COVARIATES
        and not str(c).startswith("_")
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    )


def _utc(ts: pd.Series | pd.DatetimeIndex) -> pd.Series:
    out = pd.Series(pd.to_datetime(ts))
    if out.dt.tz is None:
        return out.dt.tz_localize("UTC")
    return out.dt.tz_convert("UTC")


def _ns(ts: pd.Series) -> npt.NDArray[np.int64]:
    naive = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    out: npt.NDArray[np.int64] = naive.to_numpy("datetime64[ns]").view(np.int64)
    return out


def infer_freq(frame: pd.DataFrame) -> pd.Timedelta:
    """The typical spacing of readings: the median positive step within meters.

    Raises :class:`InputError` when no meter has two distinct timestamps.
    """
    if frame.empty:
        raise InputError("no readings: cannot infer the data frequency")
    order = frame.sort_values(["meter_id", "ts"], kind="stable")
    ns = _ns(_utc(order["ts"]))
    same = order["meter_id"].to_numpy()[1:] == order["meter_id"].to_numpy()[:-1]
    steps = np.diff(ns)[same]
    steps = steps[steps > 0]
    if len(steps) == 0:
        raise InputError(
            "cannot infer the data frequency: no meter has two distinct timestamps"
            " (give the frequency explicitly, e.g. freq='1h')"
        )
    seconds = round(float(np.median(steps)) / 1e9)
    return pd.Timedelta(seconds=max(seconds, 1))


def resolve_horizon(horizon: str | int, freq: pd.Timedelta) -> int:
    """A horizon as a number of steps: ``1``/``"1"`` are steps, ``"24h"``/``"30min"`` durations.

    >>> resolve_horizon("24h", pd.Timedelta("1h")), resolve_horizon("1d", pd.Timedelta("15min"))
    (24, 96)
    """
    if isinstance(horizon, bool):
        raise ConfigError(f"horizon must be steps or a duration, got {horizon!r}")
    if isinstance(horizon, int) or (isinstance(horizon, str) and horizon.strip().isdigit()):
        steps = int(horizon)
        if steps < 1:
            raise ConfigError(f"horizon must be at least 1 step, got {horizon!r}")
        return steps
    try:
        span = parse_duration(horizon)
    except ValueError as exc:
        raise ConfigError(
            f"invalid horizon {horizon!r}: use a number of steps (1) or a duration (30min, 24h, 1d)"
        ) from exc
    ratio = span / freq
    steps = round(ratio)
    if steps < 1 or abs(ratio - steps) > 1e-6:
        raise ConfigError(
            f"horizon {horizon!r} is not a whole number of data steps ({freq}); "
            "use a multiple of the data frequency"
        )
    return int(steps)


def _steps(duration: str, freq: pd.Timedelta) -> int:
    try:
        span = parse_duration(duration)
    except ValueError as exc:
        raise ConfigError(f"invalid feature duration {duration!r}: {exc}") from exc
    return round(span / freq)


def _mean_std(
    x: Floats, min_mean: int, min_std: int, want_std: bool = True
) -> tuple[Floats, Floats]:
    """Row-wise mean and sample std of ``x`` skipping NaN, NaN below the minimum counts."""
    valid = ~np.isnan(x)
    count = valid.sum(axis=1)
    filled = np.where(valid, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=1) / count
        if want_std:
            dev = np.where(valid, x - mean[:, None], 0.0)
            std = np.sqrt((dev * dev).sum(axis=1) / (count - 1))
        else:
            std = np.full(len(x), np.nan)
    mean = np.where(count >= min_mean, mean, np.nan)
    std = np.where(count >= min_std, std, np.nan)
    return mean, std


# --------------------------------------------------------------------------- spec and plan


@dataclass(frozen=True)
class FeatureSpec:
    """What features to compute; durations are scaled to the data frequency.

    ``freq`` is the data step (``None``: inferred from the data). Covariates
    not named in ``known_covariates`` are past-only (read at the anchor) unless
    ``past_covariates`` lists the ones to use (``()``: none). ``holidays`` is a
    country code of the ``holidays`` package (e.g. ``"FR"``); ``timezone`` is
    the zone of the local calendar.
    """

    freq: str | None = None
    recent_lags: int = 3
    seasonal_periods: tuple[str, ...] = ("1d", "7d")
    seasonal_lags: int = 2
    seasonal_means: int = 4
    rolling_windows: tuple[str, ...] = ("1d", "7d")
    calendar: str = "categorical"
    timezone: str = "UTC"
    holidays: str | None = None
    known_covariates: tuple[str, ...] = ()
    past_covariates: tuple[str, ...] | None = None
    min_window_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("seasonal_periods", "rolling_windows", "known_covariates"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.past_covariates is not None:
            object.__setattr__(self, "past_covariates", tuple(self.past_covariates))
        if self.calendar not in CALENDARS:
            raise ConfigError(
                f"calendar must be one of {', '.join(CALENDARS)}; got {self.calendar!r}"
            )
        if self.recent_lags < 1 or self.seasonal_lags < 0 or self.seasonal_means < 0:
            raise ConfigError("recent_lags must be >= 1, seasonal_lags and seasonal_means >= 0")
        if not 0 < self.min_window_fraction <= 1:
            raise ConfigError("min_window_fraction must be in (0, 1]")
        for text in (*self.seasonal_periods, *self.rolling_windows, *([self.freq])):
            if text is not None:
                try:
                    parse_duration(text)
                except ValueError as exc:
                    raise ConfigError(f"invalid feature duration {text!r}: {exc}") from exc
        try:
            pd.Timestamp("2024-01-01").tz_localize(self.timezone)
        except Exception as exc:  # pytz, zoneinfo and dateutil raise different types
            raise ConfigError(f"unknown time zone {self.timezone!r}") from exc
        if self.holidays is not None:
            import holidays as hol

            try:
                hol.country_holidays(self.holidays, years=2024)
            except NotImplementedError as exc:
                raise ConfigError(
                    f"unknown holiday country {self.holidays!r}; use an ISO code such as 'FR'"
                ) from exc

    def resolve_freq(self, frame: pd.DataFrame | None = None) -> pd.Timedelta:
        """``freq`` when given, else inferred from ``frame``."""
        if self.freq is not None:
            return parse_duration(self.freq)
        if frame is None:
            raise ConfigError("the data frequency is unknown: set FeatureSpec.freq")
        return infer_freq(frame)

    def plan(self, freq: pd.Timedelta, horizon: int, covariates: Sequence[str] = ()) -> FeaturePlan:
        """The concrete features for data step ``freq``, ``horizon`` steps and these covariates."""
        if horizon < 1:
            raise ConfigError(f"horizon must be at least 1 step, got {horizon}")
        h = int(horizon)
        p = FeaturePlan(horizon=h, freq=freq)
        p.lags = [(f"lag{i}", h + i) for i in range(self.recent_lags)]
        for text in self.seasonal_periods:
            period = _steps(text, freq)
            if period < 2:
                continue
            m = math.ceil(h / period)
            p.lags += [(f"season{text}_{j}", period * (m + j)) for j in range(self.seasonal_lags)]
            if self.seasonal_means > 0:
                offsets = tuple(period * (m + j) for j in range(self.seasonal_means))
                p.means.append((f"season{text}_mean", offsets))
        for text in self.rolling_windows:
            width = _steps(text, freq)
            if width < 2:
                continue
            low = max(1, math.ceil(width * self.min_window_fraction))
            p.windows.append((f"roll{text}", width, low, max(2, low)))
        known = [c for c in covariates if c in self.known_covariates]
        past_pool = [c for c in covariates if c not in self.known_covariates]
        if self.past_covariates is not None:
            past_pool = [c for c in past_pool if c in self.past_covariates]
        p.known = known
        p.past = past_pool
        p.calendar = self.calendar
        p.holidays = self.holidays
        p.timezone = self.timezone
        return p


@dataclass
class FeaturePlan:
    """The concrete features of one (frequency, horizon, covariates); see the module table.

    Offsets count steps back from the target time; ``max_offset`` is the
    oldest reading any feature reads.
    """

    horizon: int
    freq: pd.Timedelta
    lags: list[tuple[str, int]] = field(default_factory=list)
    means: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    windows: list[tuple[str, int, int, int]] = field(default_factory=list)  # name, W, min, min_std
    past: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)
    calendar: str = "categorical"
    holidays: str | None = None
    timezone: str = "UTC"

    @property
    def max_offset(self) -> int:
        offsets = [o for _, o in self.lags]
        offsets += [max(o) for _, o in self.means]
        offsets += [self.horizon + w - 1 for _, w, _, _ in self.windows]
        return max([self.horizon, *offsets])

    @property
    def level_columns(self) -> list[str]:
        """Features in the units and level of the value (lags, means)."""
        cols = [n for n, _ in self.lags] + [n for n, _ in self.means]
        return cols + [f"{n}_mean" for n, _, _, _ in self.windows]

    @property
    def spread_columns(self) -> list[str]:
        """Features in the units of the value but without its level (std)."""
        return [f"{n}_std" for n, _, _, _ in self.windows]

    @property
    def calendar_columns(self) -> list[str]:
        cols: list[str] = []
        if self.calendar == "categorical":
            cols = ["hour", "dow", "month"]
        elif self.calendar == "cyclic":
            cols = [f"{n}_{f}" for n in ("hour", "dow", "month") for f in ("sin", "cos")]
        return cols + (["holiday"] if self.holidays else [])

    @property
    def covariate_columns(self) -> list[str]:
        cols = [f"{c}_last" for c in self.past]
        if self.windows:
            cols += [f"{c}_{self.windows[0][0]}_mean" for c in self.past]
        return cols + list(self.known)

    @property
    def names(self) -> list[str]:
        """Every feature column, in order."""
        return (
            self.level_columns
            + self.spread_columns
            + self.covariate_columns
            + self.calendar_columns
        )

    # -- the pieces shared by the batch and the stream computations

    def calendar_features(self, ts: pd.Series) -> dict[str, Floats]:
        out: dict[str, Floats] = {}
        if self.calendar == "none" and not self.holidays:
            return out
        local = _utc(ts).dt.tz_convert(self.timezone)
        if self.calendar != "none":
            hour = (local.dt.hour + local.dt.minute / 60.0).to_numpy(np.float64)
            dow = local.dt.dayofweek.to_numpy(np.float64)
            month = local.dt.month.to_numpy(np.float64)
            if self.calendar == "categorical":
                out.update(hour=hour, dow=dow, month=month)
            else:
                for name, x, period in (
                    ("hour", hour, 24.0),
                    ("dow", dow, 7.0),
                    ("month", month - 1, 12.0),
                ):
                    out[f"{name}_sin"] = np.sin(2 * np.pi * x / period)
                    out[f"{name}_cos"] = np.cos(2 * np.pi * x / period)
        if self.holidays:
            out["holiday"] = _holiday_flags(local, self.holidays)
        return out


def _holiday_flags(local: pd.Series, country: str) -> Floats:
    import holidays as hol

    days = local.dt.tz_localize(None).dt.normalize()
    if days.empty:
        return np.zeros(0)
    years = range(int(days.dt.year.min()), int(days.dt.year.max()) + 1)
    table = hol.country_holidays(country, years=years)
    dates = pd.to_datetime(pd.Series(list(table.keys()), dtype=object)).to_numpy("datetime64[ns]")
    return np.isin(days.to_numpy("datetime64[ns]"), dates).astype(np.float64)


# --------------------------------------------------------------------------- grid


def regularize(
    frame: pd.DataFrame,
    freq: pd.Timedelta,
    origin: pd.Timestamp | None = None,
    covariates: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Readings on a regular grid per meter, sorted by meter then time.

    The grid is ``origin + k * freq`` (``origin`` defaults to the earliest
    timestamp); each timestamp snaps to the nearest slot, readings sharing a
    slot are averaged (NaN skipped), and every slot between a meter's first and
    last reading exists, NaN when nothing was read. Non-finite values become
    NaN. The input frame is not modified.
    """
    covs = list(covariate_columns(frame) if covariates is None else covariates)
    cols = ["value", *covs]
    if frame.empty:
        empty = pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
        empty.insert(0, "ts", pd.Series(dtype="datetime64[ns, UTC]"))
        empty.insert(0, "meter_id", pd.Series(dtype=object))
        return empty
    ts = _utc(frame["ts"]).reset_index(drop=True)
    start = _utc(pd.Series([origin])).iloc[0] if origin is not None else ts.min()
    step = int(freq.value)
    k = np.rint((_ns(ts) - start.value) / step).astype(np.int64)
    data = pd.DataFrame(
        {
            c: pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
            if c in frame.columns
            else np.full(len(frame), np.nan)
            for c in cols
        }
    )
    data = data.where(np.isfinite(data.to_numpy(np.float64)))
    data["meter_id"] = frame["meter_id"].astype(str).to_numpy()
    data["k"] = k
    agg = data.groupby(["meter_id", "k"], sort=True)[cols].mean()
    meters = agg.index.get_level_values(0).to_numpy()
    ks = agg.index.get_level_values(1).to_numpy(np.int64)
    first = np.r_[True, meters[1:] != meters[:-1]]
    last = np.r_[meters[1:] != meters[:-1], True]
    kmin, kmax = ks[first], ks[last]
    lengths = kmax - kmin + 1
    offsets = np.cumsum(lengths) - lengths
    n = int(lengths.sum())
    group = np.repeat(np.arange(len(lengths)), lengths)
    grid_k = kmin[group] + np.arange(n) - offsets[group]
    meter_of_row = np.cumsum(first) - 1
    pos = offsets[meter_of_row] + ks - kmin[meter_of_row]
    out = pd.DataFrame({"meter_id": meters[first][group]})
    out["ts"] = pd.to_datetime(start.value + grid_k * step, utc=True)
    values = agg.to_numpy(np.float64)
    for j, c in enumerate(cols):
        col = np.full(n, np.nan)
        col[pos] = values[:, j]
        out[c] = col
    return out


# --------------------------------------------------------------------------- batch


def build_frame(
    frame: pd.DataFrame,
    spec: FeatureSpec,
    horizon: int | str,
    *,
    freq: pd.Timedelta | None = None,
    origin: pd.Timestamp | None = None,
    covariates: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Features for every grid slot of every meter, vectorised (training and backtests).

    Returns ``meter_id, ts, value`` (the target, NaN when missing) followed by
    the plan's feature columns; a row for target ``t`` reads values only at
    ``<= t - horizon`` (and known covariates and the calendar at ``t``).
    Append NaN rows after a meter's last reading to get features for future
    targets. The input frame is not modified.
    """
    step = freq if freq is not None else spec.resolve_freq(frame)
    h = resolve_horizon(horizon, step)
    covs = tuple(covariate_columns(frame) if covariates is None else covariates)
    grid = regularize(frame, step, origin, covs)
    plan = spec.plan(step, h, covs)
    return _features_from_grid(grid, plan)


def _shift(x: Floats, pos: npt.NDArray[np.int64], s: int) -> Floats:
    """``x`` shifted ``s`` rows down within contiguous meter groups (``pos`` = row in group)."""
    out = np.full(len(x), np.nan)
    ok = pos >= s
    idx = np.flatnonzero(ok)
    out[idx] = x[idx - s]
    return out


def _features_from_grid(grid: pd.DataFrame, plan: FeaturePlan) -> pd.DataFrame:
    meters = grid["meter_id"].to_numpy()
    n = len(grid)
    first = np.r_[True, meters[1:] != meters[:-1]] if n else np.zeros(0, dtype=bool)
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    pos = np.arange(n, dtype=np.int64) - (starts[group] if n else 0)
    v = grid["value"].to_numpy(np.float64)
    h = plan.horizon
    cols: dict[str, Any] = {}
    for name, off in plan.lags:
        cols[name] = _shift(v, pos, off)
    for name, offsets in plan.means:
        stack = np.column_stack([_shift(v, pos, o) for o in offsets])
        cols[name], _ = _mean_std(stack, 1, 2, want_std=False)
    series = pd.Series(v)
    for name, width, low, low_std in plan.windows:
        rolling = series.groupby(group, sort=False).rolling(width, min_periods=low)
        mean = rolling.mean().to_numpy(np.float64)
        std_roll = series.groupby(group, sort=False).rolling(width, min_periods=low_std)
        std = std_roll.std().to_numpy(np.float64)
        cols[f"{name}_mean"] = _shift(mean, pos, h)
        cols[f"{name}_std"] = _shift(std, pos, h)
    for c in plan.past:
        x = grid[c].to_numpy(np.float64)
        cols[f"{c}_last"] = _shift(x, pos, h)
    if plan.windows:
        wname, width, low, _ = plan.windows[0]
        for c in plan.past:
            r = pd.Series(grid[c].to_numpy(np.float64)).groupby(group, sort=False)
            mean = r.rolling(width, min_periods=low).mean().to_numpy(np.float64)
            cols[f"{c}_{wname}_mean"] = _shift(mean, pos, h)
    for c in plan.known:
        cols[c] = grid[c].to_numpy(np.float64)
    cols.update(plan.calendar_features(grid["ts"]))
    out = grid[["meter_id", "ts", "value"]].reset_index(drop=True)
    features = pd.DataFrame({name: cols[name] for name in plan.names}, index=out.index)
    return pd.concat([out, features], axis=1)


# --------------------------------------------------------------------------- stream


class FeatureState:
    """Per-meter recent values for computing features incrementally (the stream).

    Holds, for every meter, the last ``max_offset + 1`` grid slots of the value
    and of each covariate. :meth:`update` takes a batch of readings (any order,
    gaps allowed; a later reading for an already filled slot replaces it);
    :meth:`features` gives exactly the numbers :func:`build_frame` gives for
    the same targets. ``origin`` fixes the grid phase (default: the first
    timestamp seen); ``max_horizon`` sizes the buffers.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        freq: pd.Timedelta | str,
        max_horizon: int | str = 1,
        covariates: Sequence[str] = (),
        origin: pd.Timestamp | None = None,
    ) -> None:
        self.spec = spec
        self.freq = parse_duration(freq) if isinstance(freq, str) else pd.Timedelta(freq)
        self.max_horizon = resolve_horizon(max_horizon, self.freq)
        self.covariates = tuple(covariates)
        self.origin = None if origin is None else _utc(pd.Series([origin])).iloc[0]
        self.length = spec.plan(self.freq, self.max_horizon, self.covariates).max_offset + 1
        self._index: dict[str, int] = {}
        self._values = np.full((0, self.length), np.nan)
        self._covs = np.full((0, self.length, len(self.covariates)), np.nan)
        self._end = np.zeros(0, dtype=np.int64)

    @property
    def meters(self) -> list[str]:
        return list(self._index)

    def _slots(self, ts: pd.Series) -> npt.NDArray[np.int64]:
        assert self.origin is not None  # noqa: S101 - set by the first update
        slots: npt.NDArray[np.int64] = np.rint(
            (_ns(_utc(ts)) - self.origin.value) / self.freq.value
        ).astype(np.int64)
        return slots

    def update(self, batch: ReadingBatch | pd.DataFrame) -> None:
        """Add readings; vectorised per meter (one NumPy step per meter in the batch)."""
        frame = batch.clean().to_pandas() if isinstance(batch, ReadingBatch) else batch
        if frame.empty:
            return
        if self.origin is None:
            self.origin = _utc(frame["ts"]).min()
        cols = ["value", *self.covariates]
        data = pd.DataFrame(
            {
                c: pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
                if c in frame.columns
                else np.full(len(frame), np.nan)
                for c in cols
            }
        )
        data = data.where(np.isfinite(data.to_numpy(np.float64)))
        data["meter_id"] = frame["meter_id"].astype(str).to_numpy()
        data["k"] = self._slots(frame["ts"].reset_index(drop=True))
        agg = data.groupby(["meter_id", "k"], sort=True)[cols].mean()
        new = [m for m in agg.index.get_level_values(0).unique() if m not in self._index]
        if new:
            for m in new:
                self._index[str(m)] = len(self._index)
            add = len(new)
            self._values = np.vstack([self._values, np.full((add, self.length), np.nan)])
            self._covs = np.concatenate(
                [self._covs, np.full((add, self.length, len(self.covariates)), np.nan)]
            )
            self._end = np.r_[self._end, np.full(add, np.iinfo(np.int64).min)]
        length = self.length
        for meter, part in agg.groupby(level=0, sort=False):
            row = self._index[str(meter)]
            ks = part.index.get_level_values(1).to_numpy(np.int64)
            top = int(ks.max())
            end = int(self._end[row])
            if end == np.iinfo(np.int64).min:
                end = top
                self._end[row] = top
            elif top > end:
                move = top - end
                if move >= length:
                    self._values[row] = np.nan
                    self._covs[row] = np.nan
                else:
                    self._values[row, :-move] = self._values[row, move:]
                    self._values[row, -move:] = np.nan
                    self._covs[row, :-move] = self._covs[row, move:]
                    self._covs[row, -move:] = np.nan
                end = top
                self._end[row] = top
            j = length - 1 - (end - ks)
            keep = j >= 0
            vals = part.to_numpy(np.float64)
            self._values[row, j[keep]] = vals[keep, 0]
            if self.covariates:
                self._covs[row, j[keep]] = vals[keep, 1:]

    def _window(
        self, rows: npt.NDArray[np.int64], k: npt.NDArray[np.int64], depth: int, cov: int | None
    ) -> Floats:
        """Values at slots ``k - d`` for ``d`` in ``0..depth``: one row per target."""
        offsets = np.arange(depth + 1)
        slots = k[:, None] - offsets[None, :]
        known = rows >= 0
        safe = np.where(known, rows, 0)
        j = self.length - 1 - (self._end[safe][:, None] - slots)
        ok = (j >= 0) & (j < self.length) & known[:, None]
        jj = np.where(ok, j, 0)
        src = self._values[safe[:, None], jj] if cov is None else self._covs[safe[:, None], jj, cov]
        return np.where(ok, src, np.nan)

    def features(
        self,
        meter_ids: Sequence[str] | npt.NDArray[Any],
        target_ts: Sequence[Any] | pd.Series | pd.DatetimeIndex,
        horizon: int | str,
        known: Mapping[str, Sequence[float] | npt.NDArray[np.float64]] | None = None,
    ) -> pd.DataFrame:
        """Features for each ``(meter_ids[i], target_ts[i])`` as if forecast ``horizon`` before.

        ``known`` gives known covariates at the target times (aligned with the
        rows); without it they are read from the buffer when the target slot is
        in it, else NaN. Unknown meters get NaN features.
        """
        h = resolve_horizon(horizon, self.freq)
        if h > self.max_horizon:
            raise ConfigError(
                f"horizon {h} steps exceeds this state's max_horizon {self.max_horizon}"
            )
        plan = self.spec.plan(self.freq, h, self.covariates)
        ids = np.asarray(meter_ids, dtype=object).astype(str)
        ts = _utc(pd.Series(list(target_ts) if not isinstance(target_ts, pd.Series) else target_ts))
        ts = ts.reset_index(drop=True)
        if self.origin is None:
            self.origin = ts.min() if len(ts) else pd.Timestamp(0, tz="UTC")
        k = self._slots(ts)
        rows = np.array([self._index.get(m, -1) for m in ids], dtype=np.int64)
        depth = plan.max_offset
        x = self._window(rows, k, depth, None)
        cols: dict[str, Any] = {}
        for name, off in plan.lags:
            cols[name] = x[:, off]
        for name, offsets in plan.means:
            cols[name], _ = _mean_std(x[:, list(offsets)], 1, 2, want_std=False)
        for name, width, low, low_std in plan.windows:
            window = x[:, h : h + width]
            cols[f"{name}_mean"], _ = _mean_std(window, low, low_std, want_std=False)
            _, cols[f"{name}_std"] = _mean_std(window, low, low_std)
        for c in plan.past:
            xc = self._window(rows, k, depth, self.covariates.index(c))
            cols[f"{c}_last"] = xc[:, h]
            if plan.windows:
                wname, width, low, _ = plan.windows[0]
                cols[f"{c}_{wname}_mean"], _ = _mean_std(
                    xc[:, h : h + width], low, 2, want_std=False
                )
        for c in plan.known:
            if known is not None and c in known:
                cols[c] = np.asarray(known[c], dtype=np.float64)
            else:
                cols[c] = self._window(rows, k, 0, self.covariates.index(c))[:, 0]
        cols.update(plan.calendar_features(ts))
        out = pd.DataFrame({"meter_id": ids, "ts": ts})
        features = pd.DataFrame({name: cols[name] for name in plan.names}, index=out.index)
        return pd.concat([out, features], axis=1)
