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
* :class:`FeatureState` keeps a per-meter ring of recent values and of their
  rolling statistics, and computes features for any ``(meter, target time)``
  with a few gathers per row (the stream).

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
    "reading_arrays",
    "regularize",
    "resolve_horizon",
]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
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
    out = ts if isinstance(ts, pd.Series) else pd.Series(ts)
    if not pd.api.types.is_datetime64_any_dtype(out.dtype):
        # only parse what is not a datetime yet: to_datetime walks tz-aware values one by one
        out = pd.Series(pd.to_datetime(out))
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
    """Row-wise mean and sample std of ``x`` skipping NaN, NaN below the minimum counts.

    Each row's numbers depend on that row's values only (never on the other
    rows or on the shape of ``x``): the stream computes a window once and
    must find the same numbers after a restart.
    """
    valid = ~np.isnan(x)
    complete = bool(valid.all())  # the common case: skip the masking (same numbers)
    count = np.count_nonzero(valid, axis=1)
    filled = x if complete else np.where(valid, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=1) / count
        if want_std:
            dev = x - mean[:, None] if complete else np.where(valid, x - mean[:, None], 0.0)
            std = np.sqrt(np.square(dev, out=dev).sum(axis=1) / (count - 1))
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

_EMPTY = np.iinfo(np.int64).min  # ``_end`` of a meter row that holds nothing yet
_MAX_GROWTH = 4  # a buffer grows to at most this many times its base length
_BLOCK = 1 << 18  # elements per temporary block when (re)computing rolling statistics
_FEW = 16  # batches up to this many readings take the scalar-friendly paths
_BIG = np.iinfo(np.int64).max
_CALENDAR_BLOCK = 4096  # slots of calendar features computed at a time (then looked up)
_CALENDAR_MAX = 1 << 18  # a wider request computes the calendar of its distinct slots only


def reading_arrays(
    frame: pd.DataFrame | ReadingBatch, covariates: Sequence[str] = ()
) -> tuple[npt.NDArray[np.object_], Ints, Floats]:
    """A reading frame as the arrays :meth:`FeatureState.update_arrays` takes.

    Returns ``ids`` (``str`` objects; ``"series"`` when the frame has no
    ``meter_id``), ``ts_ns`` (UTC nanoseconds; naive times are UTC) and
    ``data`` (``value`` then ``covariates`` in order, one row per reading,
    NaN for a missing column and for every non-finite or non-numeric entry).
    """
    if isinstance(frame, ReadingBatch):
        frame = frame.clean().to_pandas()
    if "ts" not in frame.columns or "value" not in frame.columns:
        raise InputError("a reading batch needs columns meter_id, ts, value")
    n = len(frame)
    if "meter_id" in frame.columns:
        ids = frame["meter_id"].astype(str).to_numpy(dtype=object)
    else:
        ids = np.full(n, "series", dtype=object)
    cols = ["value", *covariates]
    data = np.empty((n, len(cols)))
    for j, c in enumerate(cols):
        if c in frame.columns:
            col = frame[c]
            if not pd.api.types.is_float_dtype(col):
                col = pd.to_numeric(col, errors="coerce")
            data[:, j] = col.to_numpy(np.float64, na_value=np.nan)
        else:
            data[:, j] = np.nan
    data[~np.isfinite(data)] = np.nan
    return ids, _to_ns(frame["ts"]), data


def _to_ns(ts: Any) -> Ints:
    """UTC nanoseconds since the epoch of timestamps (an ``int64`` array is taken as such)."""
    if isinstance(ts, np.ndarray) and ts.dtype.kind in "iu":
        return ts.astype(np.int64, copy=False)
    if isinstance(ts, np.ndarray) and ts.dtype.kind == "M":
        out: Ints = ts.astype("datetime64[ns]").view(np.int64)
        return out
    if isinstance(ts, pd.Series | pd.DatetimeIndex) and (
        isinstance(ts.dtype, pd.DatetimeTZDtype) or ts.dtype.kind == "M"
    ):
        return _asi8(ts.array)  # tz-aware: UTC already; naive: taken as UTC
    if not isinstance(ts, pd.Series | pd.DatetimeIndex):
        ts = pd.Series(list(ts), dtype=object)
    index = pd.DatetimeIndex(pd.to_datetime(ts))
    return _asi8(index.array)


def _asi8(values: Any) -> Ints:
    """Nanoseconds since the epoch (UTC for tz-aware) of a pandas datetime array."""
    return np.asarray(values.as_unit("ns").asi8, dtype=np.int64)


def _starts(change: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """``True`` then ``change``: the first row of each run of a sorted array."""
    out = np.empty(len(change) + 1, dtype=bool)
    out[0] = True
    out[1:] = change
    return out


@dataclass(frozen=True)
class _Reader:
    """Where :meth:`FeatureState.feature_matrix` reads each column of one plan."""

    plan: FeaturePlan
    offsets: Ints  # value offsets gathered per row (lags and seasonal means)
    lag_cols: Ints
    lag_at: Ints
    means: list[tuple[int, Ints]]
    stat_cols: Ints  # rolling statistics at the anchor
    stat_at: Ints
    last_cols: Ints  # past covariates at the anchor
    last_at: Ints
    known: list[tuple[int, str, int]]  # column, covariate, its index
    calendar_cols: Ints

    @classmethod
    def of(cls, plan: FeaturePlan, covariates: tuple[str, ...]) -> _Reader:
        col = {name: j for j, name in enumerate(plan.names)}
        offsets = sorted({o for _, o in plan.lags} | {o for _, os in plan.means for o in os})
        at = {o: j for j, o in enumerate(offsets)}

        def ints(values: Sequence[int]) -> Ints:
            return np.array(values, dtype=np.int64)

        stat_cols, stat_at = [], []
        for i, (name, _, _, _) in enumerate(plan.windows):
            stat_cols += [col[f"{name}_mean"], col[f"{name}_std"]]
            stat_at += [2 * i, 2 * i + 1]
        if plan.windows:
            for j, c in enumerate(plan.past):
                stat_cols.append(col[f"{c}_{plan.windows[0][0]}_mean"])
                stat_at.append(2 * len(plan.windows) + j)
        return cls(
            plan=plan,
            offsets=ints(offsets),
            lag_cols=ints([col[name] for name, _ in plan.lags]),
            lag_at=ints([at[o] for _, o in plan.lags]),
            means=[(col[name], ints([at[o] for o in os])) for name, os in plan.means],
            stat_cols=ints(stat_cols),
            stat_at=ints(stat_at),
            last_cols=ints([col[f"{c}_last"] for c in plan.past]),
            last_at=ints([covariates.index(c) for c in plan.past]),
            known=[(col[c], c, covariates.index(c)) for c in plan.known],
            calendar_cols=ints([col[name] for name in plan.calendar_columns]),
        )


class FeatureState:
    """Per-meter recent values for computing features incrementally (the stream).

    Keeps, for every meter, a ring of its last :attr:`length` grid slots of
    the value and of each covariate, plus the rolling statistics of every
    slot (the window means and standard deviations, the covariates' window
    mean), computed when a slot's window changes. :meth:`update` (or
    :meth:`update_arrays`) takes a batch of readings, in any order, gaps
    allowed, and stores all of them in a handful of NumPy steps whatever the
    number of meters: readings sharing a slot in one batch are averaged (NaN
    skipped), a later reading for a slot replaces it, readings older than the
    ring are dropped. The ring holds ``plan.max_offset + 1`` slots for
    ``max_horizon`` and grows (up to four times, never shrinks) so that a
    batch spanning several steps keeps full features for its earliest rows.

    :meth:`feature_matrix` gives, for any ``(meter, target time)``, exactly the
    numbers :func:`build_frame` gives, as one matrix: a handful of gathers per
    row (one per lag or seasonal offset, one for all rolling statistics at the
    anchor), never a window per row. It is exact for every target whose reads
    are still held: ``t - plan.max_offset`` after the oldest slot of the ring
    and anchor ``t - h`` at or before the meter's latest slot (a later anchor
    is computed from the window as far as it is known). A reading arriving
    so late that a window it changes reaches below the ring updates those
    statistics from the part held. :meth:`features` is the same as a
    DataFrame.

    ``origin`` fixes the grid phase (default: the first timestamp seen);
    ``max_horizon`` sizes the buffers. Memory: ``8 * length * (1 +
    covariates + 2 * windows + past covariates)`` bytes per meter.

    >>> ts = pd.date_range("2024-01-01", periods=48, freq="h", tz="UTC")
    >>> frame = pd.DataFrame({"meter_id": "m", "ts": ts, "value": np.arange(48.0)})
    >>> state = FeatureState(FeatureSpec(seasonal_periods=("1d",), calendar="none"), "1h")
    >>> state.update(frame)
    >>> state.feature_matrix(["m"], ts[-1:] + pd.Timedelta("1h"), 1)[0, :4].tolist()
    [47.0, 46.0, 45.0, 24.0]
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
        plan = spec.plan(self.freq, self.max_horizon, self.covariates)
        #: slots held per meter for ``max_horizon``; :attr:`length` may grow beyond it
        self.base_length = plan.max_offset + 1
        self.length = self.base_length
        # horizon-free parts of every plan: the rolling windows and the covariates they average
        self._windows = [(w, low, low_std) for _, w, low, low_std in plan.windows]
        self._past = [self.covariates.index(c) for c in plan.past] if plan.windows else []
        self._nstats = 2 * len(self._windows) + len(self._past)
        self._readers: dict[int, _Reader] = {}
        self._calendar_cache: tuple[int, Floats] | None = None
        self._ids_cache: tuple[Any, Ints] | None = None
        self._index: dict[str, int] = {}
        self._n = 0
        self._alloc(0, self.length)

    # ------------------------------------------------------------------ storage

    def _alloc(self, capacity: int, length: int) -> None:
        self._values = np.full((capacity, length), np.nan)
        self._covs = np.full((capacity, length, len(self.covariates)), np.nan)
        self._stats = np.full((capacity, length, self._nstats), np.nan)
        self._end = np.full(capacity, _EMPTY, dtype=np.int64)

    @property
    def meters(self) -> list[str]:
        """The meters held, in the order they were first seen."""
        return list(self._index)

    def _rows(self, ids: Sequence[Any] | npt.NDArray[Any], add: bool) -> Ints:
        """Buffer row of each meter id (``-1`` unknown, or a new row when ``add``)."""
        cached = self._ids_cache
        if not add and cached is not None and cached[0] is ids and len(cached[1]) == len(ids):
            return cached[1]  # the ids array update_arrays just stored (read once, then dropped)
        if len(ids) <= _FEW:  # a dictionary lookup per id beats hashing the array
            keys = [str(m) for m in ids]
            if add:
                for m in keys:
                    if m not in self._index:
                        self._index[m] = len(self._index)
                self._reserve(len(self._index))
            few = np.array([self._index.get(m, -1) for m in keys], dtype=np.int64)
            if add:
                self._ids_cache = (ids, few)
            return few
        codes, uniques = pd.factorize(np.asarray(ids, dtype=object))
        names = [str(u) for u in uniques]
        rows = np.fromiter((self._index.get(m, -1) for m in names), np.int64, len(names))
        new = np.flatnonzero(rows < 0)
        if add and len(new):
            for pos in new:
                if names[pos] not in self._index:  # "1" and 1 are the same meter
                    self._index[names[pos]] = len(self._index)
                rows[pos] = self._index[names[pos]]
            self._reserve(len(self._index))
        out: Ints = rows[codes]
        if add:
            self._ids_cache = (ids, out)
        return out

    def _reserve(self, n: int) -> None:
        """Room for ``n`` meter rows (capacity doubles, so meters can arrive one at a time)."""
        if n > len(self._end):
            old = (self._values, self._covs, self._stats, self._end)
            self._alloc(max(n, 2 * len(self._end), 16), self.length)
            m = self._n
            self._values[:m], self._covs[:m], self._stats[:m], self._end[:m] = (a[:m] for a in old)
        self._n = n

    def _grow(self, length: int) -> None:
        """Re-lay every ring out for ``length`` slots (slot ``k`` lives at ``k % length``)."""
        old_len = self.length
        old = (self._values, self._covs, self._stats)
        ends = self._end[: self._n].copy()
        self.length = length
        self._alloc(len(self._end), length)
        self._end[: self._n] = ends
        rows = np.flatnonzero(ends != _EMPTY)
        if len(rows):
            slots = ends[rows, None] - np.arange(old_len)[None, :]
            r = np.broadcast_to(rows[:, None], slots.shape)
            src, dst = slots % old_len, slots % length
            for new, prev in zip((self._values, self._covs, self._stats), old, strict=True):
                new[r, dst] = prev[r, src]

    def slots(self, ts: Any) -> Ints:
        """Grid slot numbers (steps since :attr:`origin`) of timestamps or UTC nanoseconds."""
        ts_ns = _to_ns(ts)
        if self.origin is None:
            self.origin = pd.Timestamp(int(ts_ns.min()) if len(ts_ns) else 0, tz="UTC")
        out: Ints = np.rint((ts_ns - self.origin.value) / self.freq.value).astype(np.int64)
        return out

    # ------------------------------------------------------------------ updates

    def update(self, batch: ReadingBatch | pd.DataFrame) -> None:
        """Add a batch of readings (``meter_id, ts, value`` and covariates); see the class."""
        ids, ts_ns, data = reading_arrays(batch, self.covariates)
        self.update_arrays(ids, ts_ns, data)

    def update_arrays(
        self,
        ids: Sequence[Any] | npt.NDArray[Any],
        ts_ns: Ints,
        data: Floats,
        grow: bool = True,
    ) -> None:
        """Add readings given as arrays (the fast entry; see :func:`reading_arrays`).

        ``data`` holds ``value`` then :attr:`covariates`, one row per reading,
        NaN for missing. With ``grow=False`` the ring keeps its length (for
        history that only fills the buffers, whose own rows need no features).
        A :meth:`feature_matrix` call right after, with the very same ``ids``
        array object (not modified in between), reuses its meter lookup.
        """
        n = len(ids)
        if n == 0:
            return
        data = np.asarray(data, dtype=np.float64).reshape(n, 1 + len(self.covariates))
        rows = self._rows(ids, add=True)
        k = self.slots(ts_ns)
        if n > 1:
            lo_k = int(k.min())
            spread = int(k.max()) - lo_k + 1
            if spread * (int(rows.max()) + 1) < 2**62:
                order = np.argsort(rows * spread + (k - lo_k), kind="stable")
            else:  # pragma: no cover - absurd time spans only
                order = np.lexsort((k, rows))
            rs, ks, d = rows[order], k[order], data[order]
            cut = _starts((rs[1:] != rs[:-1]) | (ks[1:] != ks[:-1]))
            if not cut.all():  # readings sharing a slot: their mean, NaN skipped
                starts = np.flatnonzero(cut)
                valid = ~np.isnan(d)
                total = np.add.reduceat(np.where(valid, d, 0.0), starts, axis=0)
                count = np.add.reduceat(valid.astype(np.float64), starts, axis=0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    d = np.where(count > 0, total / count, np.nan)
                rs, ks = rs[starts], ks[starts]
        else:
            rs, ks, d = rows, k, data
        first = np.flatnonzero(_starts(rs[1:] != rs[:-1]))
        meters = rs[first]
        top = np.maximum.reduceat(ks, first)
        if grow:
            span = int((top - np.minimum.reduceat(ks, first)).max())
            need = min(self.base_length + span, self.base_length * _MAX_GROWTH)
            if need > self.length:
                self._grow(need)
        length = self.length
        old = self._end[meters]
        fresh = old == _EMPTY
        end = np.where(fresh, top, np.maximum(old, top))
        # the slots the ring advances over are emptied before anything is written
        advance = np.where(fresh, 0, np.minimum(end - np.where(fresh, 0, old), length))
        if advance.any():
            total_adv = int(advance.sum())
            at = np.repeat(end, advance) - (
                np.arange(total_adv) - np.repeat(np.cumsum(advance) - advance, advance)
            )
            who = np.repeat(meters, advance)
            self._values[who, at % length] = np.nan
            self._covs[who, at % length] = np.nan
            self._stats[who, at % length] = np.nan
        self._end[meters] = end
        counts = np.diff(np.append(first, len(rs)))
        keep = ks > np.repeat(end, counts) - length
        pos = ks[keep] % length
        self._values[rs[keep], pos] = d[keep, 0]
        if self.covariates:
            self._covs[rs[keep], pos] = d[keep, 1:]
        if self._nstats:
            lo = np.minimum.reduceat(np.where(keep, ks, _BIG), first)
            lo = np.where(fresh, lo, np.minimum(lo, np.where(fresh, _BIG - 1, old) + 1))
            lo = np.maximum(lo, end - length + 1)
            todo = lo <= end
            self._refresh(meters[todo], lo[todo], end[todo])

    def _refresh(self, meters: Ints, lo: Ints, end: Ints) -> None:
        """Recompute the rolling statistics of slots ``lo .. end`` of each meter."""
        if not len(meters):
            return
        wmax = max(w for w, _, _ in self._windows)
        depth = end - lo + 1
        order = np.argsort(depth, kind="stable")
        meters, lo, end, depth = meters[order], lo[order], end[order], depth[order]
        i = 0
        while i < len(meters):  # blocks of meters with similar depths, bounded in memory
            j = int(np.searchsorted(depth, 2 * depth[i], side="right"))
            d = int(depth[j - 1])
            j = min(j, i + max(1, _BLOCK // (d * wmax)))
            d = int(depth[j - 1])
            self._refresh_block(meters[i:j], lo[i:j], end[i:j], d, wmax)
            i = j

    def _refresh_block(self, meters: Ints, lo: Ints, end: Ints, d: int, wmax: int) -> None:
        length = self.length
        span = d + wmax - 1
        slots = end[:, None] + np.arange(1 - span, 1)[None, :]
        held = slots > (end - length)[:, None]
        flat = (meters[:, None] * length + slots % length).ravel()

        def windows(got: Floats) -> Floats:
            x = np.where(held, got.reshape(slots.shape), np.nan)
            if d == 1:  # one slot per meter: its window is the row itself
                return x
            view = np.lib.stride_tricks.sliding_window_view(x, wmax, axis=1)
            return np.ascontiguousarray(view).reshape(-1, wmax)

        ncov = len(self.covariates)
        covs = [windows(self._covs.reshape(-1, ncov)[flat, c]) for c in self._past]
        stats = self._window_stats(windows(self._values.reshape(-1)[flat]), covs)
        target = slots[:, -d:]
        write = (target >= lo[:, None]).ravel()
        rows = np.repeat(meters, d)[write]
        self._stats[rows, (target.ravel() % length)[write]] = stats[write]

    def _window_stats(self, values: Floats, covs: Sequence[Floats]) -> Floats:
        """Rolling statistics from windows (one row per slot, ``wmax`` columns, newest last)."""
        out = np.empty((len(values), self._nstats))
        for i, (w, low, low_std) in enumerate(self._windows):
            out[:, 2 * i], out[:, 2 * i + 1] = _mean_std(values[:, -w:], low, low_std)
        if covs:
            w, low, _ = self._windows[0]
            for j, x in enumerate(covs):
                out[:, 2 * len(self._windows) + j], _ = _mean_std(x[:, -w:], low, 2, want_std=False)
        return out

    # ------------------------------------------------------------------ reads

    def _plan(self, horizon: int | str) -> FeaturePlan:
        return self._reader(horizon).plan

    def _reader(self, horizon: int | str) -> _Reader:
        h = horizon if isinstance(horizon, int) else resolve_horizon(horizon, self.freq)
        reader = self._readers.get(h)
        if reader is None:
            h = resolve_horizon(h, self.freq)
            if h > self.max_horizon:
                raise ConfigError(
                    f"horizon {h} steps exceeds this state's max_horizon {self.max_horizon}"
                )
            reader = _Reader.of(self.spec.plan(self.freq, h, self.covariates), self.covariates)
            self._readers[h] = reader
        return reader

    def _gather(self, source: Floats, rows: Ints, slots: Ints) -> Floats:
        """``source[row, slot]`` per row (``slots``: one column per offset); NaN when not held."""
        known = rows >= 0
        safe = np.where(known, rows, 0)
        end = self._end[safe]
        if slots.ndim == 2:
            known, safe, end = known[:, None], safe[:, None], end[:, None]
        held = known & (slots <= end) & (slots > end - self.length)
        flat = safe * self.length + slots % self.length
        if source.ndim == 3:
            got = source.reshape(-1, source.shape[2])[flat]
            return np.where(held[..., None], got, np.nan)
        return np.where(held, source.reshape(-1)[flat], np.nan)

    def feature_matrix(
        self,
        meter_ids: Sequence[Any] | npt.NDArray[Any],
        target_ts: Any,
        horizon: int | str,
        known: Mapping[str, Sequence[float] | Floats] | None = None,
        dtype: npt.DTypeLike = np.float64,
    ) -> npt.NDArray[Any]:
        """Features for each ``(meter_ids[i], target_ts[i])`` as if forecast ``horizon`` before.

        Returns an ``(n, len(plan.names))`` array of ``dtype``, columns in
        plan order (:meth:`names`), the numbers of :func:`build_frame`.
        ``target_ts`` may be timestamps (a Series, DatetimeIndex,
        ``datetime64`` array; naive is UTC) or ``int64`` UTC nanoseconds; the
        calendar is that of the target's grid slot. ``known`` gives known
        covariates at the target times (aligned with the rows); without it
        they are read from the buffer when the target slot is in it, else
        NaN. Unknown meters get NaN features (the calendar is still filled).
        Raises :class:`ConfigError` for a horizon beyond ``max_horizon``.
        """
        r = self._reader(horizon)
        ts_ns = _to_ns(target_ts)
        n = len(ts_ns)
        k = self.slots(ts_ns)
        rows = self._rows(meter_ids, add=False) if n else np.zeros(0, np.int64)
        self._ids_cache = None
        out = np.empty((n, len(r.plan.names)), dtype=dtype)
        if len(r.offsets):
            x = self._gather(self._values, rows, k[:, None] - r.offsets[None, :])
            out[:, r.lag_cols] = x[:, r.lag_at]
            for col, at in r.means:
                out[:, col], _ = _mean_std(x[:, at], 1, 2, want_std=False)
        anchor = k - r.plan.horizon
        if len(r.stat_cols):
            stats = self._gather(self._stats, rows, anchor)
            late = np.flatnonzero((rows >= 0) & (anchor > self._end[np.maximum(rows, 0)]))
            if len(late):  # anchors after a meter's last slot: from the part of the window held
                stats[late] = self._late_stats(rows[late], anchor[late])
            out[:, r.stat_cols] = stats[:, r.stat_at]
        if len(r.last_cols):
            out[:, r.last_cols] = self._gather(self._covs, rows, anchor)[:, r.last_at]
        for col, name, j in r.known:
            if known is not None and name in known:
                out[:, col] = np.asarray(known[name], dtype=np.float64)
            else:
                out[:, col] = self._gather(self._covs, rows, k)[:, j]
        if len(r.calendar_cols):
            out[:, r.calendar_cols] = self._calendar(r.plan, k)
        return out

    def _calendar(self, plan: FeaturePlan, k: Ints) -> Floats:
        """Calendar features of slots ``k`` (of the slot's grid time, as :func:`build_frame`).

        Computed for a block of slots at a time and looked up, since a stream
        asks for the same few slots batch after batch.
        """
        names = plan.calendar_columns
        if not names or not len(k):
            return np.zeros((len(k), len(names)))
        assert self.origin is not None  # noqa: S101 - set by slots()
        lo, hi = int(k.min()), int(k.max())
        cached = self._calendar_cache
        if cached is not None and cached[0] <= lo and hi < cached[0] + len(cached[1]):
            return cached[1][k - cached[0]]
        if hi - lo >= _CALENDAR_MAX:
            wanted, inverse = np.unique(k, return_inverse=True)
        else:
            wanted = np.arange(lo, max(hi + 1, lo + _CALENDAR_BLOCK), dtype=np.int64)
            inverse = k - lo
        stamps = pd.to_datetime(self.origin.value + wanted * self.freq.value, utc=True)
        found = plan.calendar_features(pd.Series(stamps))
        table = np.column_stack([found[name] for name in names])
        if hi - lo < _CALENDAR_MAX:
            self._calendar_cache = (lo, table)
        out: Floats = table[inverse]
        return out

    def _late_stats(self, rows: Ints, anchor: Ints) -> Floats:
        wmax = max(w for w, _, _ in self._windows)
        slots = anchor[:, None] + np.arange(1 - wmax, 1)[None, :]
        values = self._gather(self._values, rows, slots)
        covs = [self._gather(self._covs, rows, slots)[:, :, c] for c in self._past]
        return self._window_stats(np.ascontiguousarray(values), covs)

    def names(self, horizon: int | str) -> list[str]:
        """The feature columns of :meth:`feature_matrix` for ``horizon``."""
        return list(self._plan(horizon).names)

    def features(
        self,
        meter_ids: Sequence[Any] | npt.NDArray[Any],
        target_ts: Any,
        horizon: int | str,
        known: Mapping[str, Sequence[float] | Floats] | None = None,
    ) -> pd.DataFrame:
        """:meth:`feature_matrix` as a DataFrame: ``meter_id, ts`` then the feature columns."""
        ids = np.asarray(meter_ids, dtype=object).astype(str)
        ts_ns = _to_ns(target_ts)
        matrix = self.feature_matrix(ids, ts_ns, horizon, known)
        out = pd.DataFrame({"meter_id": ids, "ts": pd.to_datetime(ts_ns, utc=True)})
        features = pd.DataFrame(matrix, columns=self.names(horizon), index=out.index)
        return pd.concat([out, features], axis=1)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The buffers: JSON-able meta and NumPy arrays (restore with :meth:`load_state_dict`)."""
        n = self._n
        return {
            "origin_ns": None if self.origin is None else int(self.origin.value),
            "length": int(self.length),
            "meters": list(self._index),
            "values": self._values[:n].copy(),
            "covs": self._covs[:n].copy(),
            "stats": self._stats[:n].copy(),
            "end": self._end[:n].copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore buffers from :meth:`state_dict` (of a state with the same spec and covariates).

        Only ``origin_ns`` and ``length`` are needed: without ``values`` the
        buffers start empty (fill them with :meth:`update_arrays`).
        """
        origin = state.get("origin_ns")
        self.origin = None if origin is None else pd.Timestamp(int(origin), tz="UTC")
        self.length = max(int(state["length"]), self.base_length)
        self._index = {}
        self._n = 0
        self._calendar_cache = None
        self._ids_cache = None
        self._alloc(0, self.length)
        if state.get("values") is None:
            return
        meters = [str(m) for m in state["meters"]]
        n, length, ncov = len(meters), self.length, len(self.covariates)
        self._index = {m: i for i, m in enumerate(meters)}
        self._reserve(n)
        self._values[:n] = np.asarray(state["values"], dtype=np.float64).reshape(n, length)
        self._covs[:n] = np.asarray(state["covs"], dtype=np.float64).reshape(n, length, ncov)
        self._stats[:n] = np.asarray(state["stats"], dtype=np.float64).reshape(
            n, length, self._nstats
        )
        self._end[:n] = np.asarray(state["end"], dtype=np.int64).reshape(n)
