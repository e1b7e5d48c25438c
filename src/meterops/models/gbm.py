"""A global LightGBM forecaster across meters, with calibrated 80 % intervals.

Multi-horizon strategy: **direct**. One set of boosters per configured
horizon ``h``, trained on the features of :mod:`meterops.features` for that
horizon (lags anchored at ``t - h``, seasonal lags at the most recent period
a forecast at ``t - h`` can know). Why: no error feedback through recursion,
each horizon learns its own dependence on recent vs seasonal data, and a
model for ``h`` can serve any shorter step (its features only use older
data), so :meth:`GBMForecaster.forecast` of ``H`` steps needs the ``H`` model
only, or the closest fitted horizon per step when several are configured.

One model for every meter: the target and its lag features are standardised
per meter, ``z = (y - loc) / scale`` with ``loc``/``scale`` the mean/std of that
meter's training data (nothing after the training cut-off), so meters of any
size share the trees; covariates and calendar stay in their own units.

Intervals: four boosters per horizon -- L2 for ``yhat`` (the mean), quantile
0.1 / 0.5 / 0.9 for ``q10`` / ``q50`` / ``q90``. In-sample quantile trees are
too narrow on new data, so the last ``calibration_fraction`` of the training
period is held out first: the boosters are trained on the earlier part with
early stopping on the hold-out, each quantile is shifted so that it has the
nominal share of hold-out readings below it (a split-conformal correction in
``z`` units), then the boosters are refitted on everything with the found
number of rounds and the shifts kept. Quantiles are sorted so they never cross.
The hold-out predictions are kept in ``validation_`` so a caller can compare
the model with baselines on data before its own test period.

Meters with fewer than ``min_history`` finite training readings (or unseen at
fit time) are forecast by the ``fallback`` baseline, with a logged warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Self

import lightgbm as lgb
import numpy as np
import pandas as pd

from meterops.errors import ConfigError
from meterops.features import (
    FeatureSpec,
    build_frame,
    covariate_columns,
    regularize,
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

__all__ = ["GBMForecaster"]

log = logging.getLogger("meterops.models")

_TARGETS = ("yhat", "q10", "q50", "q90")


def _fallback_model(name: str) -> NaiveForecaster:
    if name == "persistence":
        return Persistence()
    if name == "seasonal_naive_daily":
        return SeasonalNaive(period="1d")
    if name == "seasonal_naive_weekly":
        return SeasonalNaive(period="7d")
    raise ConfigError(
        f"unknown fallback {name!r}; valid: persistence, seasonal_naive_daily, "
        "seasonal_naive_weekly"
    )


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
        learning_rate: float = 0.05,
        num_leaves: int = 31,
        min_child_samples: int = 50,
        subsample: float = 0.8,
        colsample: float = 0.8,
        reg_lambda: float = 1.0,
        early_stopping: int = 50,
        calibration_fraction: float = 0.2,
        min_history: int = 100,
        min_train_rows: int = 200,
        fallback: str = "seasonal_naive_daily",
        n_jobs: int = 1,
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
        self.min_history = min_history
        self.min_train_rows = min_train_rows
        self.fallback = fallback
        self.n_jobs = n_jobs
        self.seed = seed
        if not self.horizons:
            raise ConfigError("horizons must name at least one horizon")
        if not 0 <= calibration_fraction < 1:
            raise ConfigError("calibration_fraction must be in [0, 1)")
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
            "num_threads": self.n_jobs,
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

    def _normalise(self, feats: pd.DataFrame, h: int) -> tuple[pd.DataFrame, np.ndarray]:
        """Standardised features (copy) and target in ``z`` units for rows of known meters."""
        plan = self.plans_[h]
        stats = self.stats_.reindex(feats["meter_id"])
        loc = stats["loc"].to_numpy(np.float64)
        scale = stats["scale"].to_numpy(np.float64)
        x = feats[plan.names].copy()
        for c in plan.level_columns:
            x[c] = (x[c].to_numpy(np.float64) - loc) / scale
        for c in plan.spread_columns:
            x[c] = x[c].to_numpy(np.float64) / scale
        z = (feats["value"].to_numpy(np.float64) - loc) / scale
        return x, z

    def _train(
        self, x: pd.DataFrame, z: np.ndarray, rounds: dict[str, int] | None, val: Any = None
    ) -> tuple[dict[str, lgb.Booster], dict[str, int]]:
        boosters: dict[str, lgb.Booster] = {}
        best: dict[str, int] = {}
        for target in _TARGETS:
            data = lgb.Dataset(x, z, free_raw_data=True)
            n = self.n_estimators if rounds is None else max(1, rounds[target])
            callbacks: list[Callable[..., Any]] = []
            valid_sets = []
            if val is not None:
                xv, zv = val
                valid_sets = [lgb.Dataset(xv, zv, reference=data)]
                callbacks = [lgb.early_stopping(self.early_stopping, verbose=False)]
            booster = lgb.train(
                self._params(target),
                data,
                num_boost_round=n,
                valid_sets=valid_sets,
                callbacks=callbacks,
            )
            boosters[target] = booster
            best[target] = int(booster.best_iteration or n)
        return boosters, best

    @staticmethod
    def _raw(boosters: dict[str, lgb.Booster], x: pd.DataFrame) -> dict[str, np.ndarray]:
        return {t: np.asarray(b.predict(x), dtype=np.float64) for t, b in boosters.items()}

    def fit(self, frame: pd.DataFrame) -> Self:
        df = prepare_frame(frame)
        spec = self.features or FeatureSpec()
        freq = spec.resolve_freq(df)
        steps = sorted({resolve_horizon(h, freq) for h in self.horizons})
        self.freq_ = freq
        self.origin_ = df["ts"].min()
        self.covariates_ = covariate_columns(df)
        self.spec_ = spec
        self.steps_ = steps
        grid = regularize(df, freq, self.origin_, self.covariates_)
        check_history(grid, max(steps))
        self.fallback_ = _fallback_model(self.fallback).fit(df)

        values = grid.groupby("meter_id", sort=True)["value"]
        stats = pd.DataFrame({"count": values.count(), "loc": values.mean(), "std": values.std()})
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
        if eligible.empty:
            log.warning("gbm: no meter has enough history; every forecast uses %s", self.fallback)
            return self
        train_frame = df[df["meter_id"].isin(eligible.index)]
        for h in steps:
            self._fit_horizon(train_frame, h)
        return self

    def _fit_horizon(self, df: pd.DataFrame, h: int) -> None:
        feats = build_frame(
            df,
            self.spec_,
            h,
            freq=self.freq_,
            origin=self.origin_,
            covariates=self.covariates_,
        )
        feats = feats[np.isfinite(feats["value"].to_numpy(np.float64))]
        plan = self.plans_[h]
        # rows without any reading-based feature teach nothing but the mean
        feats = feats[feats[plan.level_columns].notna().any(axis=1).to_numpy()]
        if len(feats) < self.min_train_rows:
            log.warning(
                "gbm: only %d training rows for horizon %d; using the %s baseline",
                len(feats),
                h,
                self.fallback,
            )
            return
        x, z = self._normalise(feats, h)
        ts = feats["ts"]
        first, last = ts.min(), ts.max()
        split = first + (last - first) * (1 - self.calibration_fraction)
        cal = (ts > split).to_numpy()
        rounds = None
        shifts = {t: 0.0 for t in _TARGETS}
        enough = (
            cal.sum() >= max(50, self.min_train_rows // 4) and (~cal).sum() >= self.min_train_rows
        )
        if self.calibration_fraction > 0 and enough:
            boosters, best = self._train(x[~cal], z[~cal], None, (x[cal], z[cal]))
            raw = self._raw(boosters, x[cal])
            zc = z[cal]
            for target, q in zip(("q10", "q50", "q90"), QUANTILES, strict=True):
                shifts[target] = float(np.quantile(zc - raw[target], q))
            scale = 1.0 / (1.0 - self.calibration_fraction)
            rounds = {t: round(b * scale) for t, b in best.items()}
            meta = feats.loc[cal, ["meter_id", "ts"]].reset_index(drop=True)
            self.validation_[h] = self._to_frame(meta, raw, shifts)
            self.calibration_start_[h] = pd.Timestamp(split)
        self.boosters_[h], _ = self._train(x, z, rounds)
        self.shifts_[h] = shifts

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
        self._check_fitted()
        h = resolve_horizon(horizon, self.freq_)
        if h > max(self.steps_):
            raise ConfigError(
                f"gbm was fitted for horizons {self.steps_} steps; {h} is longer"
                " (refit with horizons including it)"
            )
        df = prepare_frame(frame)
        missing = [c for c in self.covariates_ if c not in df.columns]
        if missing:
            log.warning("gbm: covariate(s) %s missing; treated as unknown (NaN)", missing)
        g = self.model_horizon(h)
        known = df["meter_id"].isin(self.stats_.index)
        parts: list[pd.DataFrame] = []
        if g is not None and known.any():
            feats = build_frame(
                df[known.to_numpy()],
                self.spec_,
                g,
                freq=self.freq_,
                origin=self.origin_,
                covariates=self.covariates_,
            )
            feats = window(feats, start, end).reset_index(drop=True)
            x, _ = self._normalise(feats, g)
            raw = self._raw(self.boosters_[g], x)
            parts.append(self._to_frame(feats[["meter_id", "ts"]], raw, self.shifts_[g]))
        rest = df[~known.to_numpy()] if g is not None else df
        if len(rest):
            others = sorted(rest["meter_id"].unique())
            log.warning(
                "gbm: %d meter(s) forecast by the %s baseline (too little training history): %s",
                len(others),
                self.fallback,
                ", ".join(others[:10]) + (" ..." if len(others) > 10 else ""),
            )
            parts.append(self.fallback_.predict(rest, h, start, end))
        if not parts:
            return pd.DataFrame({c: [] for c in FORECAST_COLUMNS})
        out = pd.concat(parts, ignore_index=True)
        return out.sort_values(["meter_id", "ts"], kind="stable").reset_index(drop=True)
