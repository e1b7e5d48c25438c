"""A global LightGBM forecaster across meters, with calibrated 80 % intervals.

Multi-horizon strategy: **direct**. One set of boosters per configured
horizon ``h``, trained on the features of :mod:`meterops.features` for that
horizon (lags anchored at ``t - h``, seasonal lags at the most recent period
a forecast at ``t - h`` can know). Why: no error feedback through recursion,
each horizon learns its own dependence on recent vs seasonal data, and a
model for ``h`` can serve any shorter step (its features only use older
data), so :meth:`GBMForecaster.forecast` of ``H`` steps needs the ``H`` model
only, or the closest fitted horizon per step when several are configured.

Day-ahead horizons (``day-ahead@10:00``, :mod:`meterops.dayahead`): every
slot of a local day is forecast from the data up to the cutoff of the day
before, so the lead varies within the day (14 .. 37 steps for hourly data).
Strategy: **one model for all leads, with the lead as a feature**
(:class:`DayAheadModel`). Each training and serving row gets the features of
its own lead ``L`` (anchored exactly at the cutoff) plus ``lead = L``; the
boosters learn how the weight of recent vs seasonal data falls with the
lead. The alternatives, and why not:

* map each lead to the smallest trained direct horizon ``>= L`` (e.g. one
  37-step model for the whole day, or a few 24/37 buckets): cheapest, but
  the early slots of the day throw away up to 23 h of data the cutoff makes
  available (at lead 14 a 37-step model reads data 23 h older than allowed);
* one direct model per lead (24 x 4 boosters for hourly data, 96 x 4 for
  15-minute data): the freshest features per lead too, but 24 x the training
  cost, and each model learns from 1/24 of the rows.

The lead-feature model has the freshness of the per-lead one and the cost of
one direct model (each target slot appears once, with its own lead); the
price is building the feature frame once per distinct lead (a few seconds
per million readings). When there are more than ``day_ahead_leads`` distinct
leads (sub-hourly data), leads are grouped into that many equal bins served
by the features of the bin's longest lead -- the "smallest trained horizon
``>= L``" rule within a bin, never fresher data than the cutoff allows.

One model for every meter: the target and its lag features are standardised
per meter, ``z = (y - loc) / scale`` with ``loc``/``scale`` the mean/std of that
meter's training data (nothing after the training cut-off), so meters of any
size share the trees; covariates and calendar stay in their own units.

Intervals: four boosters per horizon -- L2 for ``yhat`` (the mean), quantile
0.1 / 0.5 / 0.9 for ``q10`` / ``q50`` / ``q90``. In-sample quantile trees are
too narrow on new data, so the last part of the training period is held out
first: the boosters are trained on the earlier part with early stopping on
the hold-out, each quantile is shifted so that it has the nominal share of
hold-out readings below it (a split-conformal correction in ``z`` units,
with the finite-sample rank ``ceil((n + 1) q)``), then the ``yhat`` booster
alone is refitted on everything with the found number of rounds x
``1 / (1 - share held out)``. The quantile boosters are the calibration-pass
ones, so their shifts are exactly the conformal correction of the trees that
serve. Quantiles are sorted so they never cross. The hold-out predictions are
kept in ``validation_`` so a caller can compare the model with baselines on
data before its own test period.

How much is held out: ``calibration_fraction`` (20 %) of the training span,
but at least one ``calibration_cycle`` (a year) when the span holds two or
more of them. Why: the conformal shift is only as good as the hold-out is
representative of serving, and load data is seasonal in its *spread*, not
only its level (UCI household: day-ahead residual std 0.60-0.70 in summer
quarters, 0.90-1.10 in winter ones). 20 % of a three-year history is seven
months -- e.g. March to September -- so the shifts were tuned on the calm
season and applied to the volatile one (q90 shift -0.14 ``z``, test coverage
0.763 in the autumn-winter fold, 0.774 pooled). A full year in the hold-out
weighs every season as a year of serving does: UCI 24 h coverage 0.774 ->
0.820 (per fold 0.821 / 0.832 / 0.807), RMSE unchanged (0.6194 -> 0.6209);
simulated fleets with one year of data are untouched, a 900-day simulated
fleet stays at 0.805 -> 0.803. Tried and rejected (UCI, same folds): early
stopping on one half of the hold-out and calibrating on the other (0.783,
no gain: not a selection bias), refitting the quantile boosters on all data
with the old shifts (0.763: worse), shifts scaled by the interval width
(0.784), 600 quantile rounds instead of 200 (0.775).

Training cost (the ``bench train`` target: 1,000 meters x a year hourly,
8.76 M rows, under 3 min and 8 GB on 2 cores). Before: 4 boosters x (600
calibration rounds + ~750 refit rounds) on every row, a Dataset rebuilt per
booster, float64 frames -- 92 s for 50 meters, 30-70 min extrapolated for the
full fleet. Measured choices (100 meters x 365 d, 0.7 M training rows):

* ``learning_rate`` 0.1 with ``early_stopping`` 30: at 0.05 the hold-out loss
  still fell at the 600-round cap (early stopping never fired); at 0.1 it
  stops near 320 rounds with the same hold-out RMSE (0.4971 vs 0.4976 in
  ``z`` units); 0.15 was slightly worse (0.4994);
* no refit of the quantile boosters (3 of the 4 full-data refits): they are
  conformally corrected on the hold-out anyway, and refitting them would
  make the shift belong to other trees; the mean model is refitted because
  the most recent data matters most for the point forecast. Quantile
  boosters stop at ``quantile_estimators`` (200) rounds: quantile loss
  converges slowly (q50 still ran to 600) for little sharpness, and the
  shift restores coverage;
* row caps, ``max_train_rows`` (1 M) for the mean model and ``quantile_rows``
  (0.5 M) for the quantile boosters, drawn by jittered systematic sampling
  over the rows sorted by meter then time, i.e. stratified by meter and
  season; the hold-out used for early stopping and the shifts is capped at
  200 k rows (LightGBM scores validation rows tree by tree, per round). On
  the 100-meter fleet a quarter of the rows cost +0.6 % hold-out RMSE for
  the mean and +2 % pinball loss for q90; at 1,000 meters 1 M rows are still
  1,000 per meter. Data sets below the caps (every real one here) train on
  all rows, so only very large fleets are sampled;
* one ``lgb.Dataset`` per pass: binned once, the quantile set is a
  ``subset`` of it and the refit and hold-out sets reuse its bins
  (``reference``); features go in as one float32 matrix (half the memory
  of float64; LightGBM bins in float32 anyway);
* ``n_jobs`` defaults to every core. ``max_bin`` stays at LightGBM's 255:
  63 / 127 measured no faster per round here.

Memory (``bench train``: peak RSS of the meterops child, the generated fleet
and Python included, 7,181 MB before, 2,993 MB after; data alone 816 MB):

* features are built ``_CHUNK_ROWS`` (0.5 M) readings at a time, whole
  meters per chunk (features are per meter, so the rows are the same as one
  call, a test holds them equal): only one chunk's float64 feature frame is
  alive, and its rows go straight into float32 buffers sized for every
  reading (pages never written are never resident), so the training matrix
  (8.4 M x 20 float32, 0.7 GB) is never held twice. Also faster: 300 meters
  fit in 11-22 s chunked vs 30-32 s in one piece;
* the model's statistics reuse the fallback baseline's training grid instead
  of regularising the readings a second time (-190 MB at the peak);
* forecasts with a ``start`` read only the history their features can reach
  (``plan.max_offset`` steps, plus each meter's last older reading so its
  grid keeps the same slots) and predict chunk by chunk: the bench's test
  fortnight no longer builds features for the whole year (``predict``
  34.4 s -> 16.0 s).

The peak is now in the fallback baseline's ``fit`` (its copy and grid of the
readings), not in the GBM's own work.

Meters with fewer than ``min_history`` finite training readings (or unseen at
fit time) are forecast by the ``fallback`` baseline, with a logged warning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import lightgbm as lgb
import numpy as np
import pandas as pd

from meterops.dayahead import DayAhead, parse_horizon, predict_by_lead
from meterops.errors import ConfigError
from meterops.features import (
    FeaturePlan,
    FeatureSpec,
    _utc,
    build_frame,
    covariate_columns,
    resolve_horizon,
)
from meterops.models.base import (
    FORECAST_COLUMNS,
    QUANTILES,
    Forecaster,
    check_history,
    prepare_frame,
    sort_quantiles,
    window,
)
from meterops.models.baselines import NaiveForecaster, Persistence, SeasonalNaive
from meterops.models.compiled import Predictor
from meterops.settings import parse_duration

__all__ = ["DayAheadModel", "GBMForecaster"]

log = logging.getLogger("meterops.models")

_TARGETS = ("yhat", "q10", "q50", "q90")
_HOLDOUT_ROWS = 200_000  # plenty for a quantile of the residuals (coverage s.e. ~0.0007)
_CHUNK_ROWS = 500_000  # readings per feature-building part (whole meters)


def _fallback_model(name: str, freq: pd.Timedelta | None = None) -> NaiveForecaster:
    step = None if freq is None else f"{int(freq.total_seconds())}s"
    if name == "persistence":
        return Persistence(freq=step)
    if name == "seasonal_naive_daily":
        return SeasonalNaive(period="1d", freq=step)
    if name == "seasonal_naive_weekly":
        return SeasonalNaive(period="7d", freq=step)
    raise ConfigError(
        f"unknown fallback {name!r}; valid: persistence, seasonal_naive_daily, "
        "seasonal_naive_weekly"
    )


def _conformal_quantile(scores: np.ndarray, q: float) -> float:
    """The split-conformal ``q`` quantile of ``scores``, with the finite-sample correction.

    An upper bound (``q > 0.5``) takes the ``ceil((n + 1) q)``-th smallest score, a
    lower bound the ``floor((n + 1) q)``-th, so that a new score falls inside with
    probability at least the nominal level; the median is the plain median.

    >>> s = np.arange(1.0, 10.0)  # n = 9
    >>> _conformal_quantile(s, 0.9), _conformal_quantile(s, 0.1), _conformal_quantile(s, 0.5)
    (9.0, 1.0, 5.0)
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(values)
    if n == 0:
        return 0.0
    if q == 0.5:
        return float(np.median(values))
    rank = math.ceil((n + 1) * q) if q > 0.5 else math.floor((n + 1) * q)
    return float(values[min(max(rank, 1), n) - 1])


def _spread_sample(idx: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of the (sorted) ``idx``: one random pick in each of ``limit`` equal strata.

    Jittered systematic sampling: rows sorted by meter then time give every
    meter and every part of the year its share of the sample (within one row).
    """
    n = len(idx)
    if limit is None or n <= limit:
        return idx
    width = n / limit
    pick = ((np.arange(limit) + rng.random(limit)) * width).astype(np.int64)
    return idx[np.minimum(pick, n - 1)]


def _meter_chunks(df: pd.DataFrame, rows: int) -> Iterator[pd.DataFrame]:
    """``df`` in parts of whole meters, in sorted meter order, of about ``rows`` rows each.

    Features are per meter, so building them part by part gives the same rows
    as one call, with only one part's float64 intermediates alive at a time.
    """
    if len(df) <= rows:
        yield df
        return
    codes, uniques = pd.factorize(df["meter_id"], sort=True)
    ends = np.cumsum(np.bincount(codes, minlength=len(uniques)))
    order = np.argsort(codes, kind="stable")
    lo, begin = 0, 0
    while lo < len(uniques):
        hi = min(len(uniques), max(lo + 1, int(np.searchsorted(ends, begin + rows, "right"))))
        stop = int(ends[hi - 1])
        yield df.iloc[order[begin:stop]]
        lo, begin = hi, stop


def _recent(df: pd.DataFrame, start: pd.Timestamp | None, depth: pd.Timedelta) -> pd.DataFrame:
    """The readings a forecast of ``ts >= start`` can read (``depth`` back), and no older ones.

    Each meter also keeps its last reading before that, so its grid covers the
    same slots from ``start`` on as with its whole history (the rows differ
    only where no feature looks). ``start=None``: everything.
    """
    if start is None:
        return df
    cut = _utc(pd.Series([start])).iloc[0] - depth
    old = (df["ts"] < cut).to_numpy()
    if not old.any():
        return df
    ns = _ns(df["ts"][old])
    newest = pd.Series(ns).groupby(df["meter_id"].to_numpy()[old], sort=False).transform("max")
    keep = ~old
    keep[np.flatnonzero(old)[ns == newest.to_numpy()]] = True
    out: pd.DataFrame = df[keep]
    return out


def _ns(ts: pd.Series) -> np.ndarray:
    out: np.ndarray = (
        ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]").view(np.int64)
    )
    return out


def _knots(lo: int, hi: int, limit: int) -> tuple[int, ...]:
    """Feature horizons serving the leads ``lo .. hi``: each one, or ``limit`` equal bins' ends.

    >>> len(_knots(14, 37, 24)), _knots(14, 37, 24)[:3], _knots(1, 10, 3)
    (24, (14, 15, 16), (4, 8, 10))
    """
    width = max(1, math.ceil((hi - lo + 1) / max(1, limit)))
    return tuple(sorted({min(hi, lo - 1 + width * i) for i in range(1, (hi - lo) // width + 2)}))


class _Buffer:
    """A growing array: ``add`` appends rows, ``view`` is what was added (no copy)."""

    def __init__(self, rows: int, cols: int, dtype: Any) -> None:
        self._data = np.empty((max(rows, 1), cols) if cols else max(rows, 1), dtype=dtype)
        self._n = 0

    def add(self, part: np.ndarray) -> None:
        need = self._n + len(part)
        if need > len(self._data):
            bigger = np.empty(
                (max(need, 2 * len(self._data)), *self._data.shape[1:]), self._data.dtype
            )
            bigger[: self._n] = self._data[: self._n]
            self._data = bigger
        self._data[self._n : need] = part
        self._n = need

    def view(self) -> np.ndarray:
        return self._data[: self._n]


@dataclass
class _Rows:
    """Standardised training rows: features, ``z`` target, meter codes (rows of
    ``stats_``), target times (ns)."""

    x: np.ndarray
    z: np.ndarray
    ids: np.ndarray
    times: np.ndarray
    names: list[str]


@dataclass
class DayAheadModel:
    """The boosters of one day-ahead horizon of :class:`GBMForecaster` (module docstring).

    A slot of lead ``L`` gets the features of horizon :meth:`served` ``(L)``
    (the smallest knot ``>= L``; ``L`` itself beyond the last knot) and that
    horizon as the ``lead`` feature.
    """

    horizon: DayAhead
    knots: tuple[int, ...]
    plan: FeaturePlan
    boosters: dict[str, lgb.Booster] = field(default_factory=dict)
    shifts: dict[str, float] = field(default_factory=dict)
    validation: pd.DataFrame | None = None
    calibration_start: pd.Timestamp | None = None

    def served(self, leads: np.ndarray) -> np.ndarray:
        knots = np.asarray(self.knots, dtype=np.int64)
        pos = np.searchsorted(knots, leads, side="left")
        inside = pos < len(knots)
        out: np.ndarray = np.where(inside, knots[np.minimum(pos, len(knots) - 1)], leads)
        return out.astype(np.int64)


class GBMForecaster(Forecaster):
    """Global LightGBM, direct per horizon, conformalised quantiles (see the module docstring).

    >>> GBMForecaster(horizons=("24h",)).clone().horizons
    ('24h',)
    """

    name = "gbm"

    def __init__(
        self,
        *,
        horizons: Sequence[int | str] = (1,),
        features: FeatureSpec | None = None,
        n_estimators: int = 600,
        learning_rate: float = 0.1,
        num_leaves: int = 31,
        min_child_samples: int = 50,
        subsample: float = 0.8,
        colsample: float = 0.8,
        reg_lambda: float = 1.0,
        early_stopping: int = 30,
        calibration_fraction: float = 0.2,
        calibration_cycle: str | None = "365d",
        quantile_estimators: int = 200,
        max_train_rows: int | None = 1_000_000,
        quantile_rows: int | None = 500_000,
        min_history: int = 100,
        min_train_rows: int = 200,
        day_ahead_leads: int = 24,
        fallback: str = "seasonal_naive_daily",
        n_jobs: int | None = None,
        seed: int = 0,
    ) -> None:
        self.horizons = tuple(horizons)
        self.features = features
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample = colsample
        self.reg_lambda = reg_lambda
        self.early_stopping = early_stopping
        self.calibration_fraction = calibration_fraction
        self.calibration_cycle = calibration_cycle
        self.quantile_estimators = quantile_estimators
        self.max_train_rows = max_train_rows
        self.quantile_rows = quantile_rows
        self.min_history = min_history
        self.min_train_rows = min_train_rows
        self.day_ahead_leads = day_ahead_leads
        self.fallback = fallback
        self.n_jobs = n_jobs
        self.seed = seed
        if not self.horizons:
            raise ConfigError("horizons must name at least one horizon")
        if not 0 <= calibration_fraction < 1:
            raise ConfigError("calibration_fraction must be in [0, 1)")
        if calibration_cycle is not None:
            try:
                parse_duration(calibration_cycle)
            except ValueError as exc:
                raise ConfigError(f"calibration_cycle: {exc}") from exc
        for cap in ("max_train_rows", "quantile_rows"):
            value = getattr(self, cap)
            if value is not None and value < 1:
                raise ConfigError(f"{cap} must be at least 1 (or None: no cap)")
        if day_ahead_leads < 1:
            raise ConfigError("day_ahead_leads must be at least 1")
        _fallback_model(fallback)

    # ------------------------------------------------------------------ fit

    def _params(self, target: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "feature_fraction": self.colsample,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1 else 0,
            "lambda_l2": self.reg_lambda,
            "seed": self.seed,
            "num_threads": self._threads(),
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        if target == "yhat":
            params["objective"] = "regression"
        else:
            params["objective"] = "quantile"
            params["alpha"] = {"q10": 0.1, "q50": 0.5, "q90": 0.9}[target]
        return params

    def _threads(self) -> int:
        return self.n_jobs or os.cpu_count() or 1

    def _normalise(self, feats: pd.DataFrame, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Standardised features (a float32 matrix) and target in ``z`` units, per row of ``feats``.

        Rows of meters without statistics get NaN level features and target.
        """
        return self._standardise(feats, self.plans_[h], ())

    def _standardise(
        self, feats: pd.DataFrame, plan: FeaturePlan, extra: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_normalise` for any plan, with the ``extra`` columns appended unscaled."""
        pos = self.stats_.index.get_indexer(pd.Index(feats["meter_id"]))
        known = pos >= 0
        loc = np.where(known, self.stats_["loc"].to_numpy(np.float64)[pos], np.nan)
        scale = np.where(known, self.stats_["scale"].to_numpy(np.float64)[pos], np.nan)
        level, spread = set(plan.level_columns), set(plan.spread_columns)
        names = [*plan.names, *extra]
        x = np.empty((len(feats), len(names)), dtype=np.float32)
        for j, c in enumerate(names):
            col = feats[c].to_numpy(np.float64)
            if c in level:
                col = (col - loc) / scale
            elif c in spread:
                col = col / scale
            x[:, j] = col
        z = (feats["value"].to_numpy(np.float64) - loc) / scale
        return x, z

    def _train(
        self, target: str, data: lgb.Dataset, rounds: int, valid: lgb.Dataset | None = None
    ) -> tuple[lgb.Booster, int]:
        """One booster (early-stopped on ``valid`` when given) and its number of rounds."""
        callbacks: list[Callable[..., Any]] = []
        if valid is not None:
            callbacks = [lgb.early_stopping(self.early_stopping, verbose=False)]
        booster = lgb.train(
            self._params(target),
            data,
            num_boost_round=max(1, rounds),
            valid_sets=[valid] if valid is not None else [],
            callbacks=callbacks,
        )
        best = int(booster.best_iteration or 0) or booster.num_trees()
        if valid is not None and best < booster.num_trees():
            # the early-stopped booster serves (its conformal shift is computed on it): keep
            # only its best trees so a saved model holds exactly what predicts
            booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
        return booster, best

    def _raw(self, boosters: dict[str, lgb.Booster], x: np.ndarray) -> dict[str, np.ndarray]:
        threads = self._threads()
        return {
            t: np.asarray(b.predict(x, num_threads=threads), dtype=np.float64)
            for t, b in boosters.items()
        }

    def _horizon_kinds(
        self, spec: FeatureSpec, freq: pd.Timedelta
    ) -> tuple[list[int], list[DayAhead]]:
        """The configured horizons: direct ones in steps (sorted), day-ahead ones."""
        steps: set[int] = set()
        days: dict[str, DayAhead] = {}
        for h in self.horizons:
            da = parse_horizon(h, spec.timezone)
            if da is None:
                steps.add(resolve_horizon(h, freq))
            else:
                days[da.text] = da
        return sorted(steps), list(days.values())

    def fit(self, frame: pd.DataFrame) -> Self:
        df = prepare_frame(frame)
        spec = self.features or FeatureSpec()
        freq = spec.resolve_freq(df)
        steps, day_ahead = self._horizon_kinds(spec, freq)
        self.freq_ = freq
        self.origin_ = df["ts"].min()
        self.covariates_ = covariate_columns(df)
        self.spec_ = spec
        self.steps_ = steps
        # the fallback's training grid is this model's grid too (same frequency and origin)
        self.fallback_ = _fallback_model(self.fallback, freq).fit(df)
        grid = self.fallback_.train_
        first, last = grid["ts"].min(), grid["ts"].max()
        leads = [da.lead_range(first, last, freq, self.origin_) for da in day_ahead]
        check_history(grid, max([*steps, *(hi for _, hi in leads)]))
        values = grid.groupby("meter_id", sort=True)["value"]
        stats = pd.DataFrame({"count": values.count(), "loc": values.mean(), "std": values.std()})
        del grid, values
        floor = np.maximum(0.01 * stats["loc"].abs(), 1e-6)
        stats["scale"] = np.maximum(stats["std"].fillna(0.0), floor)
        eligible = stats[stats["count"] >= self.min_history]
        short = sorted(set(stats.index) - set(eligible.index))
        if short:
            log.warning(
                "gbm: %d meter(s) have fewer than %d readings and use the %s baseline: %s",
                len(short),
                self.min_history,
                self.fallback,
                ", ".join(short[:10]) + (" ..." if len(short) > 10 else ""),
            )
        self.stats_ = eligible[["loc", "scale"]]
        self.plans_ = {h: spec.plan(freq, h, self.covariates_) for h in steps}
        self.boosters_: dict[int, dict[str, lgb.Booster]] = {}
        self.shifts_: dict[int, dict[str, float]] = {}
        self.validation_: dict[int, pd.DataFrame] = {}
        self.calibration_start_: dict[int, pd.Timestamp] = {}
        self.day_ahead_: dict[str, DayAheadModel | None] = {da.text: None for da in day_ahead}
        if eligible.empty:
            log.warning("gbm: no meter has enough history; every forecast uses %s", self.fallback)
            return self
        train = df[df["meter_id"].isin(eligible.index)] if short else df
        del df
        for h in steps:
            fitted = self._fit_rows(self._training_rows(train, h), f"horizon {h}")
            if fitted is not None:
                self.boosters_[h], self.shifts_[h], held, split = fitted
                if held is not None and split is not None:
                    self.validation_[h] = held
                    self.calibration_start_[h] = split
        for da, (lo, hi) in zip(day_ahead, leads, strict=True):
            model = DayAheadModel(
                horizon=da,
                knots=_knots(lo, hi, self.day_ahead_leads),
                plan=spec.plan(freq, hi, self.covariates_),
            )
            fitted = self._fit_rows(self._training_rows(train, model), da.text)
            if fitted is not None:
                model.boosters, model.shifts, model.validation, model.calibration_start = fitted
                self.day_ahead_[da.text] = model
        return self

    # -- feature rows, a chunk of whole meters at a time (memory: see the module docstring)

    def _build(self, part: pd.DataFrame, h: int) -> pd.DataFrame:
        return build_frame(
            part, self.spec_, h, freq=self.freq_, origin=self.origin_, covariates=self.covariates_
        )

    def _feature_chunks(
        self,
        df: pd.DataFrame,
        horizon: int | DayAheadModel,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> Iterator[pd.DataFrame]:
        """Feature frames of ``start <= ts < end``, whole meters at a time, by meter then time.

        For a day-ahead model each row gets the features of its own served
        horizon (:meth:`DayAheadModel.served`) and a ``lead`` column holding it.
        """
        for part in _meter_chunks(df, _CHUNK_ROWS):
            if not isinstance(horizon, DayAheadModel):
                yield window(self._build(part, horizon), start, end).reset_index(drop=True)
                continue
            names = horizon.plan.names
            feats = self._build(part, horizon.knots[-1])
            served = horizon.served(horizon.horizon.leads(feats["ts"], self.freq_, self.origin_))
            matrix = feats[names].to_numpy(np.float64)
            for g in np.unique(served):
                rows = served == g
                if g != horizon.knots[-1]:
                    matrix[rows] = self._build(part, int(g))[names].to_numpy(np.float64)[rows]
            feats = feats[["meter_id", "ts", "value"]].copy()
            feats[names] = matrix
            feats["lead"] = served.astype(np.float64)
            yield window(feats, start, end).reset_index(drop=True)

    def _training_rows(self, df: pd.DataFrame, horizon: int | DayAheadModel) -> _Rows:
        """The standardised training rows of ``horizon`` (finite target, some level feature).

        Rows are appended chunk by chunk into buffers sized for every reading
        (pages never written are never resident), so no step holds the rows twice.
        """
        day_ahead = isinstance(horizon, DayAheadModel)
        plan = horizon.plan if isinstance(horizon, DayAheadModel) else self.plans_[horizon]
        extra = ["lead"] if day_ahead else []
        names = [*plan.names, *extra]
        x = _Buffer(len(df), len(names), np.float32)
        z = _Buffer(len(df), 0, np.float64)
        ids = _Buffer(len(df), 0, np.int32)
        times = _Buffer(len(df), 0, np.int64)
        for feats in self._feature_chunks(df, horizon):
            keep = np.isfinite(feats["value"].to_numpy(np.float64))
            # rows without any reading-based feature teach nothing but the mean
            keep &= feats[plan.level_columns].notna().any(axis=1).to_numpy()
            part = feats[keep]
            del feats
            xs, zs = self._standardise(part, plan, extra)
            x.add(xs)
            z.add(zs)
            ids.add(self.stats_.index.get_indexer(pd.Index(part["meter_id"])))
            times.add(_ns(part["ts"]))
        return _Rows(x.view(), z.view(), ids.view(), times.view(), names)

    def _fit_rows(
        self, rows: _Rows, what: str
    ) -> (
        tuple[dict[str, lgb.Booster], dict[str, float], pd.DataFrame | None, pd.Timestamp | None]
        | None
    ):
        """Boosters, conformal shifts, hold-out predictions and calibration start, or None.

        None (with a warning: the fallback serves) when there are fewer than
        ``min_train_rows`` rows.
        """
        x, z, names = rows.x, rows.z, rows.names
        if len(z) < self.min_train_rows:
            log.warning(
                "gbm: only %d training rows for %s; using the %s baseline",
                len(z),
                what,
                self.fallback,
            )
            return None
        rng = np.random.default_rng(self.seed)
        first, last = int(rows.times.min()), int(rows.times.max())
        fraction = self._calibration_share(last - first)
        split = first + int((last - first) * (1 - fraction))
        cal = rows.times > split
        shifts = {t: 0.0 for t in _TARGETS}
        enough = (
            cal.sum() >= max(50, self.min_train_rows // 4) and (~cal).sum() >= self.min_train_rows
        )
        calibrate = self.calibration_fraction > 0 and enough
        # the calibration pass trains on the earlier rows; without one, on everything
        early = np.flatnonzero(~cal) if calibrate else np.arange(len(z))
        sample = _spread_sample(early, self.max_train_rows, rng)
        data = lgb.Dataset(
            x[sample],
            z[sample],
            feature_name=names,
            params=self._params("yhat"),
            free_raw_data=False,
        ).construct()
        qpos = _spread_sample(np.arange(len(sample)), self.quantile_rows, rng)
        qdata = data if len(qpos) == len(sample) else data.subset(qpos.tolist()).construct()
        # the hold-out (early stopping, conformal shifts, ``validation_``), capped: LightGBM
        # scores it tree by tree through its bins, slower per row than training
        held = _spread_sample(np.flatnonzero(cal), _HOLDOUT_ROWS, rng)
        valid = lgb.Dataset(x[held], z[held], reference=data) if calibrate else None
        boosters: dict[str, lgb.Booster] = {}
        best: dict[str, int] = {}
        for target in _TARGETS:
            train_set = data if target == "yhat" else qdata
            cap = self.n_estimators if target == "yhat" else self.quantile_estimators
            boosters[target], best[target] = self._train(target, train_set, cap, valid)
        if not calibrate:
            return boosters, shifts, None, None
        raw = self._raw(boosters, x[held])
        zc = z[held]
        for target, q in zip(("q10", "q50", "q90"), QUANTILES, strict=True):
            shifts[target] = _conformal_quantile(zc - raw[target], q)
        meta = pd.DataFrame(
            {
                "meter_id": self.stats_.index[rows.ids[held]],
                "ts": pd.to_datetime(rows.times[held], utc=True),
            }
        )
        validation = self._to_frame(meta, raw, shifts)
        # the mean model again on everything (same bins), with proportionally more rounds
        sample = _spread_sample(np.arange(len(z)), self.max_train_rows, rng)
        full = lgb.Dataset(
            x[sample],
            z[sample],
            reference=data,
            feature_name=names,
            params=self._params("yhat"),
        )
        rounds = round(best["yhat"] / (1.0 - fraction))
        boosters["yhat"], _ = self._train("yhat", full, rounds)
        return boosters, shifts, validation, pd.Timestamp(split, tz="UTC")

    def _calibration_share(self, span_ns: int) -> float:
        """The share of the training span held out: ``calibration_fraction``, or one full
        ``calibration_cycle`` when the span holds at least two of them (module docstring)."""
        share = self.calibration_fraction
        if share > 0 and self.calibration_cycle is not None:
            cycle = parse_duration(self.calibration_cycle).value
            if cycle > 0 and span_ns >= 2 * cycle:
                share = max(share, cycle / span_ns)
        return share

    # ------------------------------------------------------------------ predict

    def _to_frame(
        self, meta: pd.DataFrame, raw: dict[str, np.ndarray], shifts: dict[str, float]
    ) -> pd.DataFrame:
        stats = self.stats_.reindex(meta["meter_id"])
        loc = stats["loc"].to_numpy(np.float64)
        scale = stats["scale"].to_numpy(np.float64)
        out = meta.copy()
        for target in _TARGETS:
            out[target] = (raw[target] + shifts.get(target, 0.0)) * scale + loc
        return sort_quantiles(out)[list(FORECAST_COLUMNS)]

    def model_horizon(self, horizon: int) -> int | None:
        """The fitted horizon that serves ``horizon`` steps: the smallest one not below it."""
        fitted = [h for h in self.steps_ if h >= horizon and h in self.boosters_]
        return min(fitted) if fitted else None

    def horizon_for_step(self, step: int) -> int:
        chosen = self.model_horizon(step)
        return step if chosen is None else chosen

    def predict(
        self,
        frame: pd.DataFrame,
        horizon: int | str,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """As-of forecasts (see :meth:`Forecaster.predict`); ``horizon`` may be ``day-ahead@HH:MM``.

        A day-ahead horizon forecasts each slot from the data up to its
        issue time (:mod:`meterops.dayahead`); it must be among ``horizons``.
        """
        self._check_fitted()
        df = prepare_frame(frame)
        missing = [c for c in self.covariates_ if c not in df.columns]
        if missing:
            log.warning("gbm: covariate(s) %s missing; treated as unknown (NaN)", missing)
        day_ahead = parse_horizon(horizon, self.spec_.timezone)
        if day_ahead is not None:
            return self._predict_day_ahead(df, day_ahead, start, end)
        h = resolve_horizon(horizon, self.freq_)
        if h > max(self.steps_, default=0):
            raise ConfigError(
                f"gbm was fitted for horizons {self.steps_} steps; {h} is longer"
                " (refit with horizons including it)"
            )
        g = self.model_horizon(h)
        if g is None:
            return self._served(
                df, None, start, end, lambda rest: self.fallback_.predict(rest, h, start, end)
            )
        depth = self.plans_[g].max_offset
        return self._served(
            df,
            (g, self.boosters_[g], self.shifts_[g], depth),
            start,
            end,
            lambda rest: self.fallback_.predict(rest, h, start, end),
        )

    def _predict_day_ahead(
        self,
        df: pd.DataFrame,
        day_ahead: DayAhead,
        start: pd.Timestamp | None,
        end: pd.Timestamp | None,
    ) -> pd.DataFrame:
        fitted = getattr(self, "day_ahead_", {})
        if day_ahead.text not in fitted:
            raise ConfigError(
                f"gbm was not fitted for {day_ahead.text}; fitted horizons:"
                f" {[*self.steps_, *fitted]} (refit with horizons including it)"
            )
        model = fitted[day_ahead.text]

        def fallback(rest: pd.DataFrame) -> pd.DataFrame:
            return predict_by_lead(
                self.fallback_.predict, rest, day_ahead, self.freq_, self.origin_, start, end
            )

        if model is None:
            return self._served(df, None, start, end, fallback)
        lo = df["ts"].min() if start is None else _utc(pd.Series([start])).iloc[0]
        hi = df["ts"].max() if end is None else _utc(pd.Series([end])).iloc[0]
        top = int(
            model.served(np.array([day_ahead.lead_range(lo, hi, self.freq_, self.origin_)[1]]))[0]
        )
        depth = self.spec_.plan(self.freq_, top, self.covariates_).max_offset
        return self._served(df, (model, model.boosters, model.shifts, depth), start, end, fallback)

    def _served(
        self,
        df: pd.DataFrame,
        model: tuple[int | DayAheadModel, dict[str, lgb.Booster], dict[str, float], int] | None,
        start: pd.Timestamp | None,
        end: pd.Timestamp | None,
        fallback: Callable[[pd.DataFrame], pd.DataFrame],
    ) -> pd.DataFrame:
        """The boosters' forecasts for known meters, the fallback's for the others."""
        known = df["meter_id"].isin(self.stats_.index).to_numpy()
        parts: list[pd.DataFrame] = []
        if model is not None and known.any():
            horizon, boosters, shifts, depth = model
            recent = _recent(df[known], start, self.freq_ * (depth + 1))
            for feats in self._feature_chunks(recent, horizon, start, end):
                plan = horizon.plan if isinstance(horizon, DayAheadModel) else self.plans_[horizon]
                extra = ["lead"] if isinstance(horizon, DayAheadModel) else []
                x, _ = self._standardise(feats, plan, extra)
                raw = self._raw(boosters, x)
                parts.append(self._to_frame(feats[["meter_id", "ts"]], raw, shifts))
        rest = df[~known] if model is not None else df
        if len(rest):
            others = sorted(rest["meter_id"].unique())
            log.warning(
                "gbm: %d meter(s) forecast by the %s baseline (too little training history): %s",
                len(others),
                self.fallback,
                ", ".join(others[:10]) + (" ..." if len(others) > 10 else ""),
            )
            parts.append(fallback(rest))
        if not parts:
            return pd.DataFrame({c: [] for c in FORECAST_COLUMNS})
        out = pd.concat(parts, ignore_index=True)
        return out.sort_values(["meter_id", "ts"], kind="stable").reset_index(drop=True)

    # ------------------------------------------------------------------ stream

    def predict_matrix(
        self,
        meter_ids: np.ndarray,
        features: np.ndarray,
        horizon: int,
        names: Sequence[str],
        predictors: Mapping[str, Predictor] | None = None,
    ) -> np.ndarray:
        """Forecasts ``(n, 4)`` = yhat, q10, q50, q90 from raw feature rows (the stream's path).

        ``features`` are rows of :class:`~meterops.features.FeatureState` for
        the fitted horizon ``horizon`` (columns ``names``, the plan's order).
        Meters unseen at fit time are standardised by their own longest rolling
        mean and std (from ``features``), so a new meter gets the global model
        rather than nothing; a row with no level at all gets NaN. ``predictors``
        (compiled copies of the horizon's boosters, :mod:`.compiled`) replace
        LightGBM's predictor when given.
        """
        plan = self.plans_[horizon]
        if list(names) != list(plan.names):
            raise ConfigError("feature columns do not match the model's plan")
        x = np.asarray(features, dtype=np.float64)
        pos = self.stats_.index.get_indexer(pd.Index(meter_ids))
        known = pos >= 0
        loc = np.where(known, self.stats_["loc"].to_numpy(np.float64)[pos], np.nan)
        scale = np.where(known, self.stats_["scale"].to_numpy(np.float64)[pos], np.nan)
        if not known.all() and plan.windows:
            name = max(plan.windows, key=lambda w: w[1])[0]
            own_loc = x[:, plan.names.index(f"{name}_mean")]
            own_scale = x[:, plan.names.index(f"{name}_std")]
            floor = np.maximum(0.01 * np.abs(own_loc), 1e-6)
            loc = np.where(known, loc, own_loc)
            scale = np.where(known, scale, np.maximum(np.nan_to_num(own_scale), floor))
        level = [plan.names.index(c) for c in plan.level_columns]
        spread = [plan.names.index(c) for c in plan.spread_columns]
        z = x.astype(np.float32)
        z[:, level] = ((x[:, level] - loc[:, None]) / scale[:, None]).astype(np.float32)
        z[:, spread] = (x[:, spread] / scale[:, None]).astype(np.float32)
        if predictors is None:
            raw = self._raw(self.boosters_[horizon], z)
        else:
            raw = {t: predict(z) for t, predict in predictors.items()}
        shifts = self.shifts_[horizon]
        out = np.column_stack([(raw[t] + shifts.get(t, 0.0)) * scale + loc for t in _TARGETS])
        q = out[:, 1:]
        ok = ~np.isnan(q).any(axis=1)
        q[ok] = np.sort(q[ok], axis=1)
        return out
