"""Anomaly detection on meter readings: one score in [0, 1], a flag and a kind per reading.

:class:`AnomalyDetector` learns each meter's normal behaviour with
:meth:`~AnomalyDetector.fit` and judges readings with
:meth:`~AnomalyDetector.score` (one output row per input row, same order).
Everything is per meter and scale-free, so meters of any size share the same
hyper-parameters.

How a reading is judged (``y`` = the value on the meter's own scale: ``log(v /
scale)`` for meters that are never negative, ``v / scale`` otherwise, with
``scale`` the meter's median absolute reading):

1. **Robust forecast and interval** (residual detector). The expected value is
   ``profile[phase] + climate(covariates) + level(t)``: ``profile`` is the
   median per slot of the local week (or day, for short series), ``climate``
   a ridge regression on hinge functions of the numeric covariates (e.g.
   temperature), ``level`` a rolling median of daily medians over
   ``level_window`` (slow drift, seasons). The three are fitted by
   backfitting, twice: the second time without the readings the first pass
   flagged, so anomalies do not bend the baseline. The residual ``e`` divided
   by the meter's robust residual scale is the standardised residual; the
   interval ``[lower, upper]`` is ``expected`` +/- ``residual_z`` scales; a
   reading outside it scores above 0.5 (kind ``spike`` when above, ``other``
   when below).
2. **Level shift**: the centred rolling median of ``e`` over
   ``shift_window``, standardised the same way, flags a sustained change of
   level (at least ``min_shift`` in ``y`` units, i.e. ~20 % by default);
   every flagged span is then grown to the readings next to it that still sit
   on the shifted side by more than half the shift, so the whole span is
   flagged, not just its start.
3. **Rules**: ``dropout`` = a reading at ~0 (``<= zero_tolerance * scale``)
   where the forecast expects at least ``10 * zero_tolerance * scale``;
   ``stuck`` = a run of identical readings longer than ``stuck_min_run`` and
   than twice the meter's 99th percentile run length seen in fit.
4. **Multivariate**: an IsolationForest over per-meter normalised features of
   :func:`meterops.features.build_frame` (value, recent lags, same phase
   yesterday / last week, rolling mean and spread, time of day and week);
   its score only counts with weight ``iforest_weight``.

Each component is mapped to ``[0, 1]`` by ``1 - 2 ** -(r / t) ** 2`` (0.5 at its
threshold ``t``) and ``score`` is the maximum; ``is_anomaly = score >= 0.5``;
``kind`` names the component that decided (``""`` for normal readings).
Missing readings score 0.

>>> import numpy as np, pandas as pd
>>> ts = pd.date_range("2024-01-01", periods=24 * 14, freq="h", tz="UTC")
>>> rng = np.random.default_rng(0)
>>> shape = 2 + np.sin(np.arange(len(ts)) * 2 * np.pi / 24)
>>> v = shape * np.exp(0.05 * rng.standard_normal(len(ts)))
>>> v[100] *= 6
>>> frame = pd.DataFrame({"meter_id": "m", "ts": ts, "value": v})
>>> out = AnomalyDetector(iforest=False).fit(frame).score(frame)
>>> bool(out.loc[100, "is_anomaly"]), out.loc[100, "kind"], int(out["is_anomaly"].sum())
(True, 'spike', 1)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError, InputError, NotFound
from meterops.features import FeatureSpec, _ns, build_frame, covariate_columns, infer_freq
from meterops.features import regularize as _regularize
from meterops.models.base import prepare_frame
from meterops.settings import parse_duration

__all__ = [
    "ANOMALY_COLUMNS",
    "ANOMALY_KINDS",
    "AnomalyDetector",
    "average_precision",
    "detection_report",
]

log = logging.getLogger("meterops.models")

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

ANOMALY_COLUMNS = (
    "meter_id",
    "ts",
    "score",
    "is_anomaly",
    "kind",
    "expected",
    "lower",
    "upper",
)
ANOMALY_KINDS = ("spike", "dropout", "level_shift", "stuck", "other")
_KIND_CODES = np.array(["", *ANOMALY_KINDS], dtype=object)
_SPIKE, _DROPOUT, _LEVEL, _STUCK, _OTHER = 1, 2, 3, 4, 5
_MAD = 1.4826
_LOG_FLOOR = 0.01  # log mode: values below 1 % of the meter's scale are clipped there


def _squash(ratio: Floats) -> Floats:
    """``1 - 2 ** -(ratio ** 2)``: 0 at 0, 0.5 at 1, towards 1 beyond."""
    r = np.nan_to_num(np.abs(ratio), nan=0.0, posinf=1e6)
    out: Floats = 1.0 - np.exp2(-(np.minimum(r, 1e3) ** 2))
    return out


@dataclass
class _Grid:
    """Readings on their meters' grids with group bookkeeping (contiguous per meter)."""

    frame: pd.DataFrame  # meter_id, ts, value, covariates
    group: Ints  # meter number per row
    pos: Ints  # row number within the meter
    meters: list[str]
    starts: Ints  # first row of each meter


def _group_info(meter_ids: npt.NDArray[Any]) -> tuple[Ints, Ints, Ints]:
    n = len(meter_ids)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    first = np.r_[True, meter_ids[1:] != meter_ids[:-1]]
    group = (np.cumsum(first) - 1).astype(np.int64)
    starts = np.flatnonzero(first).astype(np.int64)
    pos = np.arange(n, dtype=np.int64) - starts[group]
    return group, pos, starts


def _robust_scale(x: pd.Series, group: Ints, n_groups: int) -> Floats:
    """Per-group robust spread of ``x`` (NaN skipped; NaN for a group with < 4 values).

    ``0.7413 *`` the length of the shortest interval holding half the values
    (the *shorth*): like the MAD for clean normal data, but a cluster of
    shifted readings (a long level shift, up to half the data) does not
    widen it, because the shortest half sits inside the normal readings.
    """
    values = x.to_numpy(np.float64)
    out = np.full(n_groups, np.nan)
    if len(values) == 0:
        return out
    order = np.lexsort((values, group))
    sv, sg = values[order], group[order]
    bounds = np.searchsorted(sg, np.arange(n_groups + 1))
    for i in range(n_groups):
        part = sv[bounds[i] : bounds[i + 1]]
        part = part[np.isfinite(part)]
        if len(part) < 4:
            continue
        h = len(part) // 2
        out[i] = 0.7413 * float(np.min(part[h:] - part[: len(part) - h]))
    return out


def _runs(values: Floats, group: Ints) -> tuple[Ints, Ints]:
    """Run id and run length of identical consecutive finite values within each group."""
    n = len(values)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    same = np.zeros(n, dtype=bool)
    same[1:] = (
        (values[1:] == values[:-1])
        & (group[1:] == group[:-1])
        & np.isfinite(values[1:])
        & np.isfinite(values[:-1])
    )
    run_id = np.cumsum(~same) - 1
    lengths = np.bincount(run_id)
    return run_id.astype(np.int64), lengths[run_id].astype(np.int64)


def _robust_ridge(x: Floats, r: Floats, iterations: int = 4) -> Floats:
    """Ridge slopes of ``r`` on ``x`` with Tukey-biweight reweighting (intercept free).

    Reweighting drops blocks of shifted readings that plain least squares
    would explain away with the covariates (a level shift in a cold week).
    """
    w = np.ones(len(r))
    beta = np.zeros(x.shape[1])
    penalty = 1e-2 * len(r) * np.eye(x.shape[1])
    for _ in range(iterations):
        sw = w.sum()
        if sw <= x.shape[1]:
            break
        xm = x - (w @ x) / sw
        rm = r - (w @ r) / sw
        beta = np.linalg.solve((xm * w[:, None]).T @ xm + penalty, (xm * w[:, None]).T @ rm)
        res = rm - xm @ beta
        h = len(res) // 2
        sres = np.sort(res)
        spread = 0.7413 * float(np.min(sres[h:] - sres[: len(sres) - h])) if h else 0.0
        c = 4.685 * max(spread, 1e-6)
        u = np.clip(np.abs(res - np.median(res)) / c, 0.0, 1.0)
        w = (1.0 - u**2) ** 2
    return beta


def _pick(known: pd.DataFrame | None, column: str, own: Floats) -> Floats:
    """Per meter: the value learned in fit when known, else the one just computed."""
    if known is None:
        return own
    fitted = known[column].to_numpy(np.float64)
    return np.where(np.isfinite(fitted), fitted, own)


class AnomalyDetector:
    """Per-reading anomaly scores, flags and kinds for long frames of meter readings.

    Hyper-parameters (keywords, stored as given): ``freq`` the data step
    (``None``: inferred), ``timezone`` of the daily and weekly routines,
    ``residual_z`` the interval half-width in robust residual scales,
    ``shift_z`` / ``min_shift`` the level-shift threshold (scales, and a floor
    in ``y`` units: 0.2 is ~20 % for positive meters), ``shift_window`` the
    span whose median reveals a shift, ``level_window`` the span of the slow
    level, ``zero_tolerance`` what counts as ~0 relative to the meter's scale,
    ``stuck_min_run`` the shortest suspicious run of identical readings,
    ``use_covariates`` to explain the load by covariates (e.g. temperature),
    ``iforest`` / ``iforest_weight`` / ``iforest_z`` / ``n_estimators`` /
    ``max_samples`` the multivariate detector, ``threshold`` the score from
    which a reading is flagged, ``seed`` the only source of randomness.

    Learned state (after :meth:`fit`): ``freq_``, ``origin_``,
    ``covariates_``, ``meters_`` (per-meter table: scale, mode, residual
    scales, stuck run threshold, profile) and the forest.
    """

    def __init__(
        self,
        *,
        freq: str | None = None,
        timezone: str = "UTC",
        residual_z: float = 6.0,
        min_residual: float = 0.5,
        shift_z: float = 4.0,
        min_shift: float = 0.2,
        shift_window: str = "1d",
        level_window: str = "56d",
        zero_tolerance: float = 0.02,
        stuck_min_run: int = 3,
        use_covariates: bool = True,
        iforest: bool = True,
        iforest_weight: float = 0.6,
        iforest_z: float = 8.0,
        n_estimators: int = 100,
        max_samples: int = 256,
        threshold: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.freq = freq
        self.timezone = timezone
        self.residual_z = residual_z
        self.min_residual = min_residual
        self.shift_z = shift_z
        self.min_shift = min_shift
        self.shift_window = shift_window
        self.level_window = level_window
        self.zero_tolerance = zero_tolerance
        self.stuck_min_run = stuck_min_run
        self.use_covariates = use_covariates
        self.iforest = iforest
        self.iforest_weight = iforest_weight
        self.iforest_z = iforest_z
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.threshold = threshold
        self.seed = seed
        self._validate()

    # ------------------------------------------------------------------ conventions

    def _validate(self) -> None:
        for name in ("residual_z", "shift_z", "iforest_z"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("min_residual", "min_shift", "zero_tolerance", "iforest_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if self.stuck_min_run < 2:
            raise ConfigError(f"stuck_min_run must be >= 2, got {self.stuck_min_run!r}")
        for name in ("shift_window", "level_window", *(("freq",) if self.freq else ())):
            try:
                parse_duration(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from exc
        try:
            pd.Timestamp("2024-01-01").tz_localize(self.timezone)
        except Exception as exc:  # pytz, zoneinfo and dateutil raise different types
            raise ConfigError(f"unknown time zone {self.timezone!r}") from exc

    def get_params(self) -> dict[str, Any]:
        """The constructor keywords, as given."""
        sig = inspect.signature(type(self).__init__)
        return {p.name: getattr(self, p.name) for p in sig.parameters.values() if p.name != "self"}

    def clone(self) -> Self:
        """An untrained twin with the same hyper-parameters."""
        return type(self)(**self.get_params())

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "freq_")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ API

    def fit(self, frame: pd.DataFrame) -> Self:
        """Learn every meter's normal behaviour from a long frame of readings; returns ``self``.

        Raises :class:`InputError` when ``ts`` or ``value`` is missing or no
        meter has two distinct timestamps (the frequency cannot be inferred
        without ``freq``). Meters with too few readings get neutral state.
        """
        df = prepare_frame(frame)
        df = df[df["ts"].notna()]
        freq = parse_duration(self.freq) if self.freq else infer_freq(df)
        self.freq_ = freq
        self.origin_ = df["ts"].min()
        covs = covariate_columns(df) if self.use_covariates else ()
        self.covariates_: tuple[str, ...] = tuple(covs)
        grid = self._grid(df)
        self.phase_kind_ = self._phase_kind(grid)
        self.knots_ = self._knots(grid.frame)
        result = self._detect(grid, learned=None)
        self.meters_ = result["meters"]
        self.forest_: Any = None
        self.forest_center_ = 0.0
        self.forest_scale_ = 1.0
        if self.iforest and len(grid.frame) >= 32:
            self._fit_forest(grid, result)
        return self

    def score(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Judge every reading of ``frame``: one row per input row, in the input order.

        Returns :data:`ANOMALY_COLUMNS`: ``score`` in [0, 1], ``is_anomaly``
        (bool), ``kind`` (one of :data:`ANOMALY_KINDS` or ``""``), and the
        robust forecast ``expected`` with its interval ``[lower, upper]`` (in
        the value's units; NaN where unknown). Rows without a timestamp or a
        finite value score 0. Meters not seen in :meth:`fit` are learned from
        ``frame`` itself. A ``label`` column is ignored.
        """
        self._check_fitted()
        df = prepare_frame(frame).reset_index(drop=True)
        out = pd.DataFrame({"meter_id": df["meter_id"].to_numpy(), "ts": df["ts"]})
        n = len(df)
        score = np.zeros(n)
        kind = np.zeros(n, dtype=np.int64)
        expected = np.full(n, np.nan)
        lower = np.full(n, np.nan)
        upper = np.full(n, np.nan)
        ok_ts = df["ts"].notna().to_numpy()
        if ok_ts.any():
            sub = df[ok_ts]
            grid = self._grid(sub)
            result = self._detect(grid, learned=self.meters_)
            g_score, g_kind = result["score"], result["kind"]
            if self.forest_ is not None:
                f_score = self._forest_score(grid, result)
                better = f_score > g_score
                g_kind = np.where(better & (f_score >= self.threshold), _OTHER, g_kind)
                g_score = np.maximum(g_score, f_score)
            valid = np.isfinite(grid.frame["value"].to_numpy(np.float64))
            g_score = np.where(valid, g_score, 0.0)
            g_kind = np.where(valid & (g_score >= self.threshold), g_kind, 0)
            rows = self._rows_of(grid, sub)
            idx = np.flatnonzero(ok_ts)
            v = sub["value"].to_numpy(np.float64) if len(sub) else np.zeros(0)
            finite = np.isfinite(v)
            score[idx] = np.where(finite, g_score[rows], 0.0)
            kind[idx] = np.where(finite, g_kind[rows], 0)
            expected[idx] = result["expected"][rows]
            lower[idx] = result["lower"][rows]
            upper[idx] = result["upper"][rows]
        out["score"] = np.clip(score, 0.0, 1.0)
        out["is_anomaly"] = out["score"].to_numpy() >= self.threshold
        out["kind"] = _KIND_CODES[np.where(out["is_anomaly"].to_numpy(), kind, 0)]
        out["expected"] = expected
        out["lower"] = lower
        out["upper"] = upper
        return out[list(ANOMALY_COLUMNS)]

    def fit_score(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``fit(frame).score(frame)``: unsupervised detection on one frame."""
        return self.fit(frame).score(frame)

    # ------------------------------------------------------------------ internals

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFound(f"{type(self).__name__} is not fitted yet; call fit(frame) first")

    def _grid(self, df: pd.DataFrame) -> _Grid:
        covs = [c for c in self.covariates_ if c in df.columns]
        grid = _regularize(df, self.freq_, self.origin_, covs)
        for c in self.covariates_:
            if c not in grid.columns:
                grid[c] = np.nan
        group, pos, starts = _group_info(grid["meter_id"].to_numpy())
        meters = [str(m) for m in grid["meter_id"].to_numpy()[starts]]
        return _Grid(grid.reset_index(drop=True), group, pos, meters, starts)

    def _rows_of(self, grid: _Grid, df: pd.DataFrame) -> Ints:
        """The grid row of each reading of ``df`` (same snapping as :func:`regularize`)."""
        step = int(self.freq_.value)
        k = np.rint((_ns(df["ts"]) - self.origin_.value) / step).astype(np.int64)
        gts = _ns(grid.frame["ts"])
        kmin = np.rint((gts[grid.starts] - self.origin_.value) / step).astype(np.int64)
        where = {m: i for i, m in enumerate(grid.meters)}
        g = np.array([where[m] for m in df["meter_id"].astype(str).to_numpy()], dtype=np.int64)
        rows: Ints = grid.starts[g] + k - kmin[g]
        return rows

    def _steps(self, duration: str) -> int:
        return max(1, round(parse_duration(duration) / self.freq_))

    def _phase_kind(self, grid: _Grid) -> str:
        """``week`` with >= 3 weeks of data, ``day`` with >= 3 days (sub-daily data), else none."""
        if len(grid.frame) == 0:
            return "none"
        span = self.freq_ * float(np.median(np.bincount(grid.group)))
        if span >= pd.Timedelta(days=21):
            return "week"
        if span >= pd.Timedelta(days=3) and self.freq_ < pd.Timedelta(days=1):
            return "day"
        return "none"

    def _phase(self, ts: pd.Series) -> Ints:
        if self.phase_kind_ == "none" or len(ts) == 0:
            return np.zeros(len(ts), dtype=np.int64)
        local = ts.dt.tz_convert(self.timezone)
        minutes = (local.dt.hour * 60 + local.dt.minute).to_numpy(np.int64)
        if self.phase_kind_ == "week":
            minutes = minutes + local.dt.dayofweek.to_numpy(np.int64) * 1440
        step = max(1, round(self.freq_ / pd.Timedelta(minutes=1)))
        phase: Ints = minutes // step
        return phase

    def _knots(self, grid: pd.DataFrame) -> dict[str, tuple[float, float, Floats]]:
        """Per covariate: centre, spread and hinge knots (quantiles), from the fit data."""
        knots: dict[str, tuple[float, float, Floats]] = {}
        for c in self.covariates_:
            x = grid[c].to_numpy(np.float64)
            x = x[np.isfinite(x)]
            if len(x) < 10 or np.ptp(x) == 0:
                continue
            center, spread = float(np.median(x)), float(np.std(x)) or 1.0
            qs = np.unique(np.quantile((x - center) / spread, [0.1, 0.3, 0.5, 0.7, 0.9]))
            knots[c] = (center, spread, qs)
        return knots

    def _design(self, grid: pd.DataFrame) -> Floats:
        cols: list[Floats] = []
        for c, (center, spread, qs) in self.knots_.items():
            x = (grid[c].to_numpy(np.float64) - center) / spread
            cols.append(x)
            cols += [np.maximum(x - q, 0.0) for q in qs]
        if not cols:
            return np.zeros((len(grid), 0))
        return np.column_stack(cols)

    # -- the decomposition and the detectors

    def _transform(
        self, grid: _Grid, learned: pd.DataFrame | None
    ) -> tuple[Floats, Floats, Bools, Floats]:
        """``y`` on each meter's scale, per-meter scale and log mode, per-row scale."""
        v = grid.frame["value"].to_numpy(np.float64)
        n_groups = len(grid.meters)
        absv = pd.Series(np.abs(v)).groupby(grid.group)
        scale = absv.median().reindex(range(n_groups)).to_numpy(np.float64)
        mean_abs = absv.mean().reindex(range(n_groups)).to_numpy(np.float64)
        scale = np.where(scale > 0, scale, mean_abs)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        neg = pd.Series(v < 0).groupby(grid.group).mean().reindex(range(n_groups))
        log_mode = neg.to_numpy(np.float64) <= 0.01
        if learned is not None:
            known = learned.reindex(grid.meters)
            has = known["scale"].notna().to_numpy()
            scale = np.where(has, known["scale"].to_numpy(np.float64), scale)
            log_mode = np.where(has, known["log_mode"].to_numpy(bool), log_mode)
        s_row = scale[grid.group] if len(v) else np.zeros(0)
        lm_row = log_mode[grid.group] if len(v) else np.zeros(0, dtype=bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = v / s_row
            y = np.where(lm_row, np.log(np.maximum(rel, _LOG_FLOOR)), rel)
        y = np.where(np.isfinite(v), y, np.nan)
        return y, scale, log_mode, s_row

    def _profile(self, r: Floats, phase: Ints, group: Ints) -> Floats:
        frame = pd.DataFrame({"g": group, "p": phase, "r": r})
        prof = frame.groupby(["g", "p"])["r"].transform("median").to_numpy(np.float64)
        return np.where(np.isfinite(prof), prof, 0.0)

    def _level(self, r: Floats, grid: _Grid) -> Floats:
        """Slow level: rolling median (``level_window``) of daily medians, per meter."""
        spd = max(1, round(pd.Timedelta(days=1) / self.freq_))
        day = grid.pos // spd
        frame = pd.DataFrame({"g": grid.group, "d": day, "r": r})
        daily = frame.groupby(["g", "d"])["r"].agg(["median", "count"])
        med = daily["median"].where(daily["count"] >= max(1, spd // 4))
        days = max(3, round(parse_duration(self.level_window) / pd.Timedelta(days=1)))
        g_idx = daily.index.get_level_values(0).to_numpy()
        trailing = med.groupby(g_idx).rolling(days, min_periods=1).median().to_numpy(np.float64)
        # A full window everywhere: centred inside the series, flush with its ends
        # near them (a truncated window would let a shift near the end own the level).
        grp, i, first = _group_info(g_idx)
        count = np.bincount(grp)[grp] if len(grp) else np.zeros(0, dtype=np.int64)
        j = np.minimum(np.maximum(i + days // 2, days - 1), count - 1)
        smooth = trailing[first[grp] + j] if len(grp) else trailing
        smooth_s = pd.Series(smooth).groupby(g_idx).transform(lambda s: s.ffill().bfill())
        table = pd.Series(smooth_s.to_numpy(np.float64), index=daily.index)
        lv = table.reindex(pd.MultiIndex.from_arrays([grid.group, day])).to_numpy(np.float64)
        return np.where(np.isfinite(lv), lv, 0.0)

    def _climate(self, r: Floats, grid: _Grid, learned: pd.DataFrame | None) -> Floats:
        x = self._design(grid.frame)
        n = len(r)
        if x.shape[1] == 0 or n == 0:
            return np.zeros(n)
        xok: Bools = np.asarray(np.isfinite(x).all(axis=1), dtype=bool)
        out = np.zeros(n)
        coefs = getattr(self, "_coefs", {})
        for i, meter in enumerate(grid.meters):
            lo = int(grid.starts[i])
            hi = int(grid.starts[i + 1]) if i + 1 < len(grid.starts) else n
            xs, rs, oks = x[lo:hi], r[lo:hi], xok[lo:hi]
            use: Bools = np.asarray(oks & np.isfinite(rs), dtype=bool)
            beta = None
            if learned is not None and meter in coefs:
                beta = coefs[meter]
            elif use.sum() >= 10 * (x.shape[1] + 1):
                beta = _robust_ridge(xs[use], rs[use])
                if learned is None:
                    self._pending[meter] = beta
            if beta is not None:
                fitted = np.where(oks, np.nan_to_num(xs) @ beta, 0.0)
                base = fitted[use].mean() if use.any() else 0.0
                out[lo:hi] = np.where(oks, fitted - base, 0.0)
        return out

    def _detect(self, grid: _Grid, learned: pd.DataFrame | None) -> dict[str, Any]:
        n = len(grid.frame)
        n_groups = len(grid.meters)
        v = grid.frame["value"].to_numpy(np.float64)
        y, scale, log_mode, s_row = self._transform(grid, learned)
        valid = np.isfinite(y)
        phase = self._phase(grid.frame["ts"])
        self._pending: dict[str, Floats] = {}
        if learned is None:
            self._coefs: dict[str, Floats] = {}
        keep = valid.copy()
        lm_row = log_mode[grid.group] if n else np.zeros(0, dtype=bool)
        prof = np.zeros(n)
        clim = np.zeros(n)
        lev = np.zeros(n)
        names = np.asarray(grid.meters, dtype=object)[grid.group] if n else np.zeros(0, object)
        flags: dict[str, Any] = {}
        for _ in range(2):
            masked = np.where(keep, y, np.nan)
            for _ in range(2):
                if learned is not None:
                    prof = self._learned_profile(names, phase, grid, learned, masked - clim - lev)
                else:
                    prof = self._profile(masked - clim - lev, phase, grid.group)
                lev = self._level(masked - prof - clim, grid)
                clim = self._climate(masked - prof - lev, grid, learned)
            flags = self._flags(grid, v, y, valid, prof + clim + lev, s_row, learned, lm_row)
            keep = valid & ~flags["any"]
        if learned is None:
            self._coefs = dict(self._pending)
        base = prof + clim + lev
        width = flags["point_scale"]
        half = self.residual_z * width
        expected = np.where(lm_row, s_row * np.exp(base), s_row * base)
        lower = np.where(lm_row, s_row * np.exp(base - half), s_row * (base - half))
        upper = np.where(lm_row, s_row * np.exp(base + half), s_row * (base + half))
        meters = pd.DataFrame(
            {
                "scale": scale,
                "log_mode": log_mode,
                "point_scale": flags["meter_point_scale"],
                "shift_scale": flags["meter_shift_scale"],
                "stuck_run": flags["meter_stuck_run"],
            },
            index=pd.Index(grid.meters, name="meter_id"),
        )
        if learned is None:
            table = pd.DataFrame(
                {"m": names, "p": phase, "r": np.where(keep, y - clim - lev, np.nan)}
            )
            meters.attrs["profile"] = table.groupby(["m", "p"])["r"].median()
        return {
            "score": flags["score"],
            "kind": flags["kind"],
            "expected": expected,
            "lower": lower,
            "upper": upper,
            "residual": y - base,
            "y": y,
            "meters": meters if learned is None else learned,
            "n_groups": n_groups,
        }

    def _learned_profile(
        self, names: npt.NDArray[Any], phase: Ints, grid: _Grid, learned: pd.DataFrame, r: Floats
    ) -> Floats:
        """The fitted profile of known meters; unknown meters (or slots) learn their own."""
        table: pd.Series = learned.attrs["profile"]
        idx = pd.MultiIndex.from_arrays([names, phase])
        prof = table.reindex(idx).to_numpy(np.float64)
        own = self._profile(r, phase, grid.group)
        return np.where(np.isfinite(prof), prof, own)

    def _flags(
        self,
        grid: _Grid,
        v: Floats,
        y: Floats,
        valid: Bools,
        base: Floats,
        s_row: Floats,
        learned: pd.DataFrame | None,
        log_row: Bools,
    ) -> dict[str, Any]:
        n = len(v)
        n_groups = len(grid.meters)
        g = grid.group
        e = np.where(valid, y - base, np.nan)
        known = learned.reindex(grid.meters) if learned is not None else None

        # dropout: ~0 where the forecast expects clearly more
        expected_rel = np.where(log_row, np.exp(base), base)
        near_zero = valid & (np.abs(v) <= self.zero_tolerance * s_row)
        expect_more = expected_rel >= 10 * self.zero_tolerance
        dropout = near_zero & expect_more

        # stuck: runs of identical readings longer than usual
        run_id, run_len = _runs(v, g)
        first = np.r_[True, run_id[1:] != run_id[:-1]] if n else np.zeros(0, dtype=bool)
        runs = pd.Series(run_len[first & valid]).groupby(g[first & valid])
        q99 = runs.quantile(0.99).reindex(range(n_groups)).to_numpy(np.float64)
        own_thr = np.maximum(float(self.stuck_min_run), 2.0 * np.nan_to_num(q99, nan=1.0))
        stuck_thr = _pick(known, "stuck_run", own_thr)
        thr_row = stuck_thr[g] if n else np.zeros(0)
        stuck = valid & ~near_zero & (run_len >= thr_row)
        stuck_ratio = np.where(valid & ~near_zero, run_len / np.maximum(thr_row, 1.0), 0.0)

        rule = dropout | stuck
        e_clean = np.where(rule, np.nan, e)

        # point residuals against the robust forecast
        p_scale = _pick(known, "point_scale", _robust_scale(pd.Series(e_clean), g, n_groups))
        p_scale = np.where(np.isfinite(p_scale), p_scale, 0.0)
        p_eff = np.maximum(p_scale, self.min_residual / self.residual_z)
        z_pt = e_clean / p_eff[g] if n else np.zeros(0)

        # level shift: a sustained move of the residual's rolling median
        width = self._steps(self.shift_window)
        e_shift = e_clean  # the rolling median shrugs off isolated points itself
        smooth = (
            pd.Series(e_shift)
            .groupby(g)
            .rolling(width, center=True, min_periods=max(1, width // 2))
            .median()
            .to_numpy(np.float64)
        )
        s_scale = _pick(known, "shift_scale", _robust_scale(pd.Series(smooth), g, n_groups))
        s_scale = np.where(np.isfinite(s_scale), s_scale, 0.0)
        s_eff = np.maximum(s_scale, self.min_shift / self.shift_z)
        z_sh = smooth / s_eff[g] if n else np.zeros(0)
        shifted = np.abs(np.nan_to_num(z_sh)) >= self.shift_z
        shifted, z_span = self._grow(shifted, z_sh, e / s_eff[g] if n else e, grid)

        # one column per kind (codes - 1); rule hits are near-certain, a short run says nothing
        z_pt0 = np.nan_to_num(z_pt)
        comp = np.column_stack(
            [
                _squash(z_pt0 / self.residual_z) * (z_pt0 > 0),
                np.where(dropout, 0.99, 0.0),
                _squash(z_span / self.shift_z),
                np.where(stuck, np.maximum(_squash(stuck_ratio), 0.9), 0.0),
                _squash(z_pt0 / self.residual_z) * (z_pt0 < 0),
            ]
        ).reshape(n, 5)
        # priority when several fire: dropout, stuck, level shift, spike, other
        order = [1, 3, 2, 0, 4]
        score = comp.max(axis=1) if n else np.zeros(0)
        kind = np.zeros(n, dtype=np.int64)
        for j in reversed(order):
            kind = np.where(comp[:, j] >= self.threshold, j + 1, kind)
        kind = np.where(score >= self.threshold, kind, np.argmax(comp, axis=1) + 1 if n else kind)
        return {
            "score": score,
            "kind": kind,
            "any": score >= self.threshold,
            "point_scale": p_eff[g] if n else np.zeros(0),
            "meter_point_scale": p_scale,
            "meter_shift_scale": s_scale,
            "meter_stuck_run": stuck_thr,
        }

    def _grow(
        self, flagged: Bools, z_smooth: Floats, z_raw: Floats, grid: _Grid
    ) -> tuple[Bools, Floats]:
        """Grow each flagged span over neighbours still shifted by half its median shift.

        Returns the new mask and, per row, the span's standardised shift (the
        smoothed value outside spans).
        """
        out = flagged.copy()
        z_span = np.nan_to_num(np.abs(z_smooth)).copy()
        n = len(flagged)
        if not flagged.any():
            return out, z_span
        g = grid.group
        edges = np.diff(np.r_[0, flagged.astype(np.int8), 0])
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)  # exclusive
        for a, b in zip(starts, ends, strict=True):
            seg = z_smooth[a:b]
            m = float(np.nanmedian(seg)) if np.isfinite(seg).any() else 0.0
            if m == 0.0:
                continue
            sign, half = np.sign(m), abs(m) / 2
            meter = g[a]
            lo = a
            while lo > 0 and g[lo - 1] == meter:
                x = z_raw[lo - 1]
                if np.isfinite(x) and sign * x < half:
                    break
                lo -= 1
            hi = b
            while hi < n and g[hi] == meter:
                x = z_raw[hi]
                if np.isfinite(x) and sign * x < half:
                    break
                hi += 1
            # trim readings at the edges that already look normal
            while lo < hi and np.isfinite(z_raw[lo]) and sign * z_raw[lo] < half:
                lo += 1
            while hi > lo and np.isfinite(z_raw[hi - 1]) and sign * z_raw[hi - 1] < half:
                hi -= 1
            out[a:b] = False
            out[lo:hi] = True
            z_span[lo:hi] = np.maximum(z_span[lo:hi], abs(m))
        z_span = np.where(out, z_span, np.minimum(z_span, self.shift_z * 0.99))
        return out, z_span

    # -- the multivariate detector

    def _forest_features(self, grid: _Grid, result: dict[str, Any]) -> Floats:
        spec = FeatureSpec(
            freq=None,
            recent_lags=2,
            seasonal_periods=("1d", "7d"),
            seasonal_lags=1,
            seasonal_means=0,
            rolling_windows=("1d",),
            calendar="cyclic",
            timezone=self.timezone,
        )
        src = grid.frame[["meter_id", "ts", "value"]]
        feats = build_frame(src, spec, 1, freq=self.freq_, origin=self.origin_, covariates=())
        if len(feats) != len(grid.frame):  # pragma: no cover - same grid by construction
            raise InputError("internal: feature grid does not match the reading grid")
        scale = result["meters"].reindex(grid.meters)["scale"].to_numpy(np.float64)
        s_row = scale[grid.group]
        cols = []
        for c in ("value", "lag0", "lag1", "season1d_0", "season7d_0", "roll1d_mean"):
            if c in feats.columns:
                cols.append(np.log1p(np.maximum(feats[c].to_numpy(np.float64) / s_row, -0.99)))
        if "roll1d_std" in feats.columns:
            cols.append(feats["roll1d_std"].to_numpy(np.float64) / s_row)
        for c in ("hour_sin", "hour_cos", "dow_sin", "dow_cos"):
            if c in feats.columns:
                cols.append(feats[c].to_numpy(np.float64))
        x = np.column_stack(cols)
        finite = np.where(np.isfinite(x), x, np.nan)
        col_median = np.nan_to_num(pd.DataFrame(finite).median().to_numpy(np.float64))
        x = np.where(np.isfinite(x), x, col_median[None, :])
        return x

    def _fit_forest(self, grid: _Grid, result: dict[str, Any]) -> None:
        from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]

        x = self._forest_features(grid, result)
        valid = np.isfinite(grid.frame["value"].to_numpy(np.float64))
        x = x[valid]
        if len(x) < 32:
            return
        rng = np.random.default_rng(self.seed)
        take = rng.choice(len(x), size=min(len(x), 50_000), replace=False)
        forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=min(self.max_samples, len(take)),
            random_state=self.seed,
        )
        forest.fit(x[take])
        s = -forest.score_samples(x[take])
        center = float(np.median(s))
        spread = float(np.median(np.abs(s - center)) * _MAD) or 1.0
        self.forest_ = forest
        self.forest_center_ = center
        self.forest_scale_ = spread

    def _forest_score(self, grid: _Grid, result: dict[str, Any]) -> Floats:
        if len(grid.frame) == 0:
            return np.zeros(0)
        x = self._forest_features(grid, result)
        s = -self.forest_.score_samples(x)
        z = np.maximum((s - self.forest_center_) / self.forest_scale_, 0.0)
        out: Floats = self.iforest_weight * _squash(z / self.iforest_z)
        return out


def average_precision(
    truth: Sequence[bool] | npt.NDArray[Any], scores: Sequence[float] | Floats
) -> float | None:
    """Area under the precision-recall curve as average precision (PR-AUC); None without positives.

    ``sum_n (R_n - R_(n-1)) P_n`` over the thresholds at each distinct score,
    highest first (the step-wise definition of scikit-learn's
    ``average_precision_score``, no interpolation); tied scores enter together.
    Non-finite scores rank lowest.

    >>> average_precision([True, False, True, False], [0.9, 0.8, 0.7, 0.1])  # (1 + 2/3) / 2
    0.8333333333333333
    """
    t = np.asarray(truth, dtype=bool)
    sc = np.asarray(scores, dtype=np.float64)
    if len(t) != len(sc):
        raise InputError(f"{len(t)} labels but {len(sc)} scores")
    positives = int(t.sum())
    if positives == 0:
        return None
    sc = np.where(np.isfinite(sc), sc, -np.inf)
    order = np.argsort(-sc, kind="mergesort")
    ranked, hits = sc[order], t[order]
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    last = np.r_[ranked[1:] != ranked[:-1], True]  # the end of each group of tied scores
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def detection_report(
    labels: Sequence[Any] | pd.Series | npt.NDArray[Any],
    flags: Sequence[bool] | pd.Series | npt.NDArray[Any],
    scores: Sequence[float] | pd.Series | npt.NDArray[Any] | None = None,
) -> dict[str, Any]:
    """Precision, recall, F1 of ``flags`` against ``labels`` ("" / NaN = normal); recall per kind.

    With ``scores`` (higher = more anomalous) also ``pr_auc``: the average
    precision of the scores (:func:`average_precision`, threshold-free) for
    anomaly vs normal, and per kind the PR-AUC of that kind against the
    normal readings only (other kinds left out, so a kind is not penalised
    for ranking below another kind). ``pr_auc`` is ``None`` without labelled
    anomalies; compare it with ``base_rate`` (the PR-AUC of random scores).

    >>> detection_report(["", "spike", "stuck", ""], [False, True, False, True])["f1"]
    0.5
    >>> detection_report(["", "spike", "", "stuck"], [0, 1, 0, 0], [0.1, 0.9, 0.2, 0.3])["pr_auc"]
    1.0
    """
    lab = pd.Series(labels, dtype=object).fillna("").astype(str).str.strip().to_numpy()
    flag = np.asarray(flags, dtype=bool)
    if len(lab) != len(flag):
        raise InputError(f"{len(lab)} labels but {len(flag)} flags")
    score = None if scores is None else np.asarray(scores, dtype=np.float64)
    if score is not None and len(score) != len(lab):
        raise InputError(f"{len(lab)} labels but {len(score)} scores")
    truth = lab != ""
    tp = int((truth & flag).sum())
    fp = int((~truth & flag).sum())
    fn = int((truth & ~flag).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_kind: dict[str, dict[str, Any]] = {}
    for k in sorted(set(lab[truth])):
        sel = lab == k
        per_kind[str(k)] = {"n": int(sel.sum()), "recall": float(flag[sel].mean())}
        if score is not None:
            pool = sel | ~truth
            per_kind[str(k)]["pr_auc"] = average_precision(sel[pool], score[pool])
    report: dict[str, Any] = {
        "n": len(lab),
        "labelled": int(truth.sum()),
        "flagged": int(flag.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "per_kind": per_kind,
    }
    if score is not None:
        report["pr_auc"] = average_precision(truth, score)
        report["base_rate"] = float(truth.mean()) if len(truth) else None
    return report
