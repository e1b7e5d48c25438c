"""Event probability: will the next period cross a threshold ("rain tomorrow")?

An :class:`EventTarget` defines a binary event over the *target period* of a
horizon ``h`` (steps, or a duration such as ``"1d"``): for target time ``t``
the period is the grid slots ``t - h + 1 .. t`` (the ``h`` steps after the
anchor ``a = t - h``), their values of ``column`` are aggregated (``sum``,
``mean`` or ``max``) and compared with ``threshold``::

    event(t) = agg(x[t - h + 1], ..., x[t])  <op>  threshold

On daily data with ``h = 1`` that is simply "tomorrow's precipitation > 1 mm"
seen from today. A period with a missing slot has an unknown event (NaN),
which is neither learned from nor scored.

:class:`EventForecaster` predicts ``P(event(t))`` from the one feature
definition (:func:`meterops.features.build_frame` with horizon ``h``), so a
row for ``t`` reads data at ``<= t - h`` only; known covariates (a weather
forecast) are read at ``t`` and may never include the event column itself.
The event column is modelled as the series: when it is a covariate it takes
the place of ``value`` and the original ``value`` becomes the covariate
``reading``. Fitting (estimator conventions of :mod:`meterops.models.base`):

1. a LightGBM classifier is trained on the earlier ``1 - calibration_fraction``
   of the time span, with early stopping on the later part (the hold-out);
   training periods overlapping a hold-out period are left out of this step;
2. a calibrator (``"platt"``: logistic on the raw score, ``"isotonic"``, or
   ``"none"``) is fitted on the hold-out, and the decision ``threshold_`` is
   the one that maximises F1 of the calibrated hold-out probabilities;
3. the classifier is refitted on everything with the rounds found, scaled to
   the larger data; the calibrator and the threshold are kept.

:func:`event_metrics` judges probabilities: Brier score, ROC-AUC, log loss
and F1 / precision / recall at a threshold. :func:`backtest_events` runs the
model and two baselines on the same rolling-origin folds as
:func:`meterops.backtest.run_backtest`: ``climatology`` (the training base
rate as the probability) and ``persistence`` ("like the last known period":
the event of the period ending at ``t - h``). Each model's decision threshold
comes from training data only.

>>> EventTarget.parse("precipitation>1", horizon="1d")
EventTarget(column='precipitation', operator='>', threshold=1.0, aggregation='sum', horizon='1d')
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Self

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError, InputError, NotFound
from meterops.features import (
    FeatureSpec,
    _utc,
    build_frame,
    covariate_columns,
    infer_freq,
    regularize,
    resolve_horizon,
)
from meterops.models.base import check_history, prepare_frame, window
from meterops.settings import parse_duration

__all__ = [
    "AGGREGATIONS",
    "CALIBRATIONS",
    "EVENT_MODELS",
    "EVENT_PREDICTION_COLUMNS",
    "OPERATORS",
    "EventForecaster",
    "EventTarget",
    "backtest_events",
    "best_f1_threshold",
    "event_metrics",
]

log = logging.getLogger("meterops.models")

Floats = npt.NDArray[np.float64]
OPERATORS: dict[str, Callable[[Floats, float], npt.NDArray[np.bool_]]] = {
    ">": np.greater,
    ">=": np.greater_equal,
    "<": np.less,
    "<=": np.less_equal,
}
AGGREGATIONS = ("sum", "mean", "max")
CALIBRATIONS = ("platt", "isotonic", "none")
EVENT_MODELS = ("gbm", "climatology", "persistence")
EVENT_PREDICTION_COLUMNS = ("meter_id", "ts", "model", "probability", "event")
RENAMED_VALUE = "reading"
_EXPRESSION = re.compile(
    r"^\s*(?P<column>[A-Za-z_][A-Za-z0-9_.:-]*)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?P<threshold>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


# --------------------------------------------------------------------------- target


@dataclass(frozen=True)
class EventTarget:
    """A binary event over the next ``horizon``: ``agg(column over the period) <op> threshold``.

    ``column`` is ``"value"`` or a numeric covariate of the reading frame.
    """

    column: str = "value"
    operator: str = ">"
    threshold: float = 0.0
    aggregation: str = "sum"
    horizon: str = "1"

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ConfigError(
                f"event operator must be one of {', '.join(OPERATORS)}; got {self.operator!r}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"event aggregation must be one of {', '.join(AGGREGATIONS)};"
                f" got {self.aggregation!r}"
            )
        if not self.column:
            raise ConfigError("event column must be named")
        threshold = float(self.threshold)
        if not math.isfinite(threshold):
            raise ConfigError(f"event threshold must be finite; got {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "horizon", str(self.horizon))

    @classmethod
    def parse(cls, expression: str, horizon: str | int = "1", aggregation: str = "sum") -> Self:
        """An event from ``"column<op>threshold"``, e.g. ``"precipitation>1"``.

        >>> EventTarget.parse("value <= -2.5", horizon=3, aggregation="max").threshold
        -2.5
        """
        match = _EXPRESSION.match(expression)
        if match is None:
            raise ConfigError(
                f"invalid event {expression!r}: use COLUMN OP NUMBER with OP one of"
                " >, >=, <, <= (e.g. 'precipitation>1')"
            )
        return cls(
            column=match["column"],
            operator=match["op"],
            threshold=float(match["threshold"]),
            aggregation=aggregation,
            horizon=str(horizon),
        )

    def __str__(self) -> str:
        return (
            f"{self.aggregation}({self.column} over the next {self.horizon})"
            f" {self.operator} {self.threshold:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "operator": self.operator,
            "threshold": self.threshold,
            "aggregation": self.aggregation,
            "horizon": self.horizon,
        }

    def steps(self, freq: pd.Timedelta) -> int:
        """The horizon (and period length) in data steps of ``freq``."""
        return resolve_horizon(self.horizon, freq)

    def decide(self, aggregated: Floats) -> Floats:
        """1.0 / 0.0 where the aggregate meets the condition, NaN where it is unknown."""
        x = np.asarray(aggregated, dtype=np.float64)
        known = np.isfinite(x)
        out = np.full(len(x), np.nan)
        out[known] = OPERATORS[self.operator](x[known], self.threshold).astype(np.float64)
        return out

    def period_events(self, values: Floats, meters: npt.NDArray[Any], steps: int) -> Floats:
        """Events of a regular grid sorted by meter then time (``values`` = the event column).

        Row ``i`` gets the event of the period ``i - steps + 1 .. i`` of its
        meter; NaN when a slot of the period is missing or before the meter's
        first slot.
        """
        series = pd.Series(np.asarray(values, dtype=np.float64))
        groups = pd.Series(np.asarray(meters)).ne(pd.Series(np.asarray(meters)).shift()).cumsum()
        rolling = series.groupby(groups.to_numpy(), sort=False).rolling(steps, min_periods=steps)
        agg = getattr(rolling, self.aggregation)().to_numpy(np.float64)
        return self.decide(agg)

    def labels(self, frame: pd.DataFrame, freq: pd.Timedelta | str | None = None) -> pd.DataFrame:
        """``meter_id, ts, event`` for every grid slot of every meter of a reading frame.

        ``freq`` defaults to the inferred data step. The frame is not modified.
        """
        series = _as_event_series(prepare_frame(frame), self.column)
        if freq is None:
            step = infer_freq(series)
        else:
            step = parse_duration(freq) if isinstance(freq, str) else pd.Timedelta(freq)
        grid = regularize(series, step, None, ())
        events = self.period_events(
            grid["value"].to_numpy(np.float64), grid["meter_id"].to_numpy(), self.steps(step)
        )
        return grid[["meter_id", "ts"]].assign(event=events)


def _as_event_series(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The frame with the event column as ``value`` (the old value becomes ``reading``)."""
    if column == "value":
        return frame
    if column not in frame.columns:
        covs = ", ".join(c for c in covariate_columns(frame) if c != "value") or "none"
        raise InputError(
            f"event column {column!r} is not in the data; it must be the value column or a"
            f" numeric covariate (covariates: {covs})"
        )
    if not pd.api.types.is_numeric_dtype(frame[column]):
        raise InputError(f"event column {column!r} is not numeric")
    name = RENAMED_VALUE
    while name in frame.columns:
        name += "_"
    return frame.rename(columns={"value": name, column: "value"})


# --------------------------------------------------------------------------- metrics


def best_f1_threshold(y: Floats, p: Floats) -> float:
    """The probability threshold (decide ``p >= threshold``) with the best F1 on ``(y, p)``.

    The threshold is halfway between the chosen probability and the next
    lower one (0.0 when deciding "always"); 0.5 when ``y`` has no event.

    >>> best_f1_threshold(np.array([0.0, 1.0, 1.0, 0.0]), np.array([0.1, 0.8, 0.6, 0.4]))
    0.5
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    positives = y.sum()
    if len(y) == 0 or positives == 0:
        return 0.5
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    flagged = np.arange(1, len(ys) + 1)
    last_of_tie = np.r_[ps[1:] != ps[:-1], True]
    f1 = np.where(last_of_tie, 2 * tp / (flagged + positives), -1.0)
    k = int(np.argmax(f1))
    if k == len(ps) - 1:
        return 0.0
    return float((ps[k] + ps[k + 1]) / 2)


def event_metrics(y: Floats, p: Floats, threshold: float = 0.5) -> dict[str, float | int | None]:
    """Brier, ROC-AUC, log loss and F1 / precision / recall (at ``p >= threshold``).

    ``roc_auc`` is ``None`` when ``y`` holds one class only; F1 is 0 when
    nothing is flagged or nothing happened.

    >>> m = event_metrics(np.array([1.0, 0.0]), np.array([0.8, 0.4]))
    >>> round(m["brier"], 4), m["roc_auc"], m["f1"]
    (0.1, 1.0, 1.0)
    """
    from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    n = len(y)
    out: dict[str, float | int | None] = {
        "n": n,
        "events": int(y.sum()),
        "base_rate": None,
        "brier": None,
        "roc_auc": None,
        "log_loss": None,
        "f1": None,
        "precision": None,
        "recall": None,
        "threshold": float(threshold),
    }
    if n == 0:
        return out
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    flagged = p >= threshold
    tp = float((flagged & (y == 1)).sum())
    fp = float((flagged & (y == 0)).sum())
    fn = float((~flagged & (y == 1)).sum())
    out.update(
        base_rate=float(y.mean()),
        brier=float(np.mean((p - y) ** 2)),
        log_loss=float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    )
    if 0 < y.sum() < n:
        out["roc_auc"] = float(roc_auc_score(y, p))
    return out


# --------------------------------------------------------------------------- model


class _Calibrator:
    """Maps raw classifier scores (log-odds) to probabilities."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.model: Any = None

    def fit(self, raw: Floats, y: Floats) -> Self:
        if self.method == "platt":
            from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

            self.model = LogisticRegression(C=1e4).fit(raw.reshape(-1, 1), y.astype(int))
        elif self.method == "isotonic":
            from sklearn.isotonic import IsotonicRegression  # type: ignore[import-untyped]

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            self.model = iso.fit(raw, y)
        return self

    def __call__(self, raw: Floats) -> Floats:
        if self.model is None:
            return 1.0 / (1.0 + np.exp(-raw))
        if self.method == "platt":
            return np.asarray(self.model.predict_proba(raw.reshape(-1, 1))[:, 1], np.float64)
        return np.asarray(self.model.predict(raw), dtype=np.float64)


class EventForecaster:
    """Calibrated LightGBM probability of an :class:`EventTarget` (see the module docstring).

    Hyper-parameters are the keywords, stored as given; learned state ends in
    ``_``; randomness comes only from ``seed``; :meth:`clone` is an untrained
    twin.

    >>> model = EventForecaster(target=EventTarget("precipitation", ">", 1.0, horizon="1d"))
    >>> model.clone().target.column
    'precipitation'
    """

    name = "gbm"

    def __init__(
        self,
        *,
        target: EventTarget,
        features: FeatureSpec | None = None,
        n_estimators: int = 500,
        learning_rate: float = 0.03,
        num_leaves: int = 15,
        min_child_samples: int = 20,
        subsample: float = 0.8,
        colsample: float = 0.8,
        reg_lambda: float = 1.0,
        early_stopping: int = 50,
        calibration: str = "platt",
        calibration_fraction: float = 0.25,
        min_train_rows: int = 100,
        n_jobs: int = 1,
        seed: int = 0,
    ) -> None:
        self.target = target
        self.features = features
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample = colsample
        self.reg_lambda = reg_lambda
        self.early_stopping = early_stopping
        self.calibration = calibration
        self.calibration_fraction = calibration_fraction
        self.min_train_rows = min_train_rows
        self.n_jobs = n_jobs
        self.seed = seed
        if not isinstance(target, EventTarget):
            raise ConfigError("target must be an EventTarget (e.g. EventTarget.parse('rain>1'))")
        if calibration not in CALIBRATIONS:
            raise ConfigError(
                f"calibration must be one of {', '.join(CALIBRATIONS)}; got {calibration!r}"
            )
        if not 0 < calibration_fraction < 1:
            raise ConfigError("calibration_fraction must be in (0, 1)")
        spec = features or FeatureSpec()
        if target.column in spec.known_covariates or (
            target.column == "value" and "value" in spec.known_covariates
        ):
            raise ConfigError(
                f"the event column {target.column!r} cannot be a known covariate:"
                " it would read the future it is asked to predict"
            )

    # ------------------------------------------------------------------ conventions

    def get_params(self) -> dict[str, Any]:
        """The constructor keywords, as given."""
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {p.name: getattr(self, p.name) for p in sig.parameters.values() if p.name != "self"}

    def clone(self) -> Self:
        """An untrained twin with the same hyper-parameters."""
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "freq_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFound(f"{type(self).__name__} is not fitted yet; call fit(frame) first")

    # ------------------------------------------------------------------ fit

    def _params(self) -> dict[str, Any]:
        return {
            "objective": "binary",
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

    def _features(self, series: pd.DataFrame) -> pd.DataFrame:
        """Feature rows of every grid slot plus ``event`` (the target of the row)."""
        feats = build_frame(
            series,
            self.spec_,
            self.steps_,
            freq=self.freq_,
            origin=self.origin_,
            covariates=self.covariates_,
        )
        feats["event"] = self.target.period_events(
            feats["value"].to_numpy(np.float64), feats["meter_id"].to_numpy(), self.steps_
        )
        return feats

    def fit(self, frame: pd.DataFrame) -> Self:
        """Learn from a reading frame (see the module docstring); returns ``self``.

        Raises :class:`InputError` when the event column is missing or the
        history is shorter than the horizon.
        """
        series = _as_event_series(prepare_frame(frame), self.target.column)
        spec = self.features or FeatureSpec()
        freq = spec.resolve_freq(series)
        self.freq_ = freq
        self.origin_ = series["ts"].min()
        self.covariates_ = covariate_columns(series)
        self.spec_ = spec
        self.steps_ = self.target.steps(freq)
        check_history(regularize(series, freq, self.origin_, ()), self.steps_)
        self.plan_ = spec.plan(freq, self.steps_, self.covariates_)
        feats = self._features(series)
        feats = feats[np.isfinite(feats["event"].to_numpy(np.float64))]
        feats = feats[feats[self.plan_.level_columns].notna().any(axis=1).to_numpy()]
        y = feats["event"].to_numpy(np.float64)
        self.base_rate_ = float(y.mean()) if len(y) else math.nan
        self.booster_: lgb.Booster | None = None
        self.calibrator_ = _Calibrator("none")
        self.threshold_ = 0.5
        self.validation_ = pd.DataFrame(columns=["meter_id", "ts", "probability", "event"])
        self.calibration_start_: pd.Timestamp | None = None
        self.best_iteration_ = 0
        if len(y) == 0:
            raise InputError(
                f"no period of the data has a known event for {self.target}; check the column"
            )
        if len(y) < self.min_train_rows or y.min() == y.max():
            log.warning(
                "events: %d training rows with %d event(s); predicting the base rate %.3f",
                len(y),
                int(y.sum()),
                self.base_rate_,
            )
            return self
        x = feats[self.plan_.names]
        ts = feats["ts"]
        first, last = ts.min(), ts.max()
        split = first + (last - first) * (1 - self.calibration_fraction)
        hold = (ts > split).to_numpy()
        # purge the periods that overlap the hold-out's (h > 1): their events share its slots
        early_rows = (ts <= split - self.freq_ * (self.steps_ - 1)).to_numpy()
        rounds = self.n_estimators
        yh = y[hold]
        if hold.sum() >= 30 and early_rows.sum() >= 30 and 0 < yh.sum() < len(yh):
            early = self._train(x[early_rows], y[early_rows], (x[hold], yh))
            raw = np.asarray(early.predict(x[hold], raw_score=True), dtype=np.float64)
            if self.calibration != "none":
                self.calibrator_ = _Calibrator(self.calibration).fit(raw, yh)
            prob = self.calibrator_(raw)
            self.threshold_ = best_f1_threshold(yh, prob)
            self.best_iteration_ = int(early.best_iteration or self.n_estimators)
            rounds = max(1, round(self.best_iteration_ / (1 - self.calibration_fraction)))
            self.calibration_start_ = pd.Timestamp(split)
            self.validation_ = feats.loc[hold, ["meter_id", "ts"]].reset_index(drop=True)
            self.validation_["probability"] = prob
            self.validation_["event"] = yh
        else:
            log.warning("events: hold-out too small or one-class; probabilities not calibrated")
        self.booster_ = self._train(x, y, None, rounds)
        return self

    def _train(
        self,
        x: pd.DataFrame,
        y: Floats,
        val: tuple[pd.DataFrame, Floats] | None,
        rounds: int | None = None,
    ) -> lgb.Booster:
        data = lgb.Dataset(x, y, free_raw_data=True)
        valid_sets = []
        callbacks: list[Callable[..., Any]] = []
        if val is not None:
            valid_sets = [lgb.Dataset(val[0], val[1], reference=data)]
            callbacks = [lgb.early_stopping(self.early_stopping, verbose=False)]
        return lgb.train(
            self._params(),
            data,
            num_boost_round=rounds or self.n_estimators,
            valid_sets=valid_sets,
            callbacks=callbacks,
        )

    # ------------------------------------------------------------------ predict

    def predict_proba(
        self,
        frame: pd.DataFrame,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """As-of ``meter_id, ts, probability`` for every grid slot ``start <= ts < end``.

        The probability of the event of the period ending at ``ts`` is made
        from data at ``<= ts - horizon`` only; values in ``frame`` after that
        are ignored by construction.
        """
        self._check_fitted()
        series = _as_event_series(prepare_frame(frame), self.target.column)
        missing = [c for c in self.covariates_ if c not in series.columns]
        if missing:
            log.warning("events: covariate(s) %s missing; treated as unknown (NaN)", missing)
        feats = build_frame(
            series,
            self.spec_,
            self.steps_,
            freq=self.freq_,
            origin=self.origin_,
            covariates=self.covariates_,
        )
        feats = window(feats, start, end).reset_index(drop=True)
        out = feats[["meter_id", "ts"]].copy()
        if self.booster_ is None:
            out["probability"] = self.base_rate_
        else:
            raw = np.asarray(
                self.booster_.predict(feats[self.plan_.names], raw_score=True), dtype=np.float64
            )
            out["probability"] = self.calibrator_(raw)
        return out

    def predict(
        self,
        frame: pd.DataFrame,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """:meth:`predict_proba` plus ``alert`` (1 when ``probability >= threshold_``)."""
        out = self.predict_proba(frame, start, end)
        out["alert"] = (out["probability"].to_numpy() >= self.threshold_).astype(np.int64)
        return out

    def forecast(self, history: pd.DataFrame) -> pd.DataFrame:
        """The probability of the event of the next period after each meter's last reading.

        Returns ``meter_id, ts, probability, alert`` with ``ts`` the end of the
        period (last reading + horizon), one row per meter.
        """
        self._check_fitted()
        hist = prepare_frame(history)
        last = hist.groupby("meter_id", sort=True)["ts"].max()
        ahead = pd.DataFrame(
            {
                "meter_id": last.index.to_numpy(),
                "ts": last.to_numpy() + self.freq_ * self.steps_,
                "value": np.nan,
            }
        )
        ext = pd.concat([hist, ahead], ignore_index=True)
        pred = self.predict(ext, start=_utc(ahead["ts"]).min())
        return ahead[["meter_id", "ts"]].merge(pred, on=["meter_id", "ts"], how="left")


# --------------------------------------------------------------------------- backtest


def backtest_events(
    frame: pd.DataFrame,
    target: EventTarget,
    test_start: pd.Timestamp | str | None = None,
    folds: int = 3,
    *,
    features: FeatureSpec | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    params: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The event model and the baselines on the same rolling-origin folds.

    Folds are cut as in :func:`meterops.backtest.run_backtest`. Returns the
    metrics document (``target``, ``horizon_steps``, ``freq``, ``folds``,
    ``models`` with :func:`event_metrics` pooled over folds, ROC-AUC as the
    point-weighted mean of the folds' AUCs, ``per_fold``) and
    predictions with :data:`EVENT_PREDICTION_COLUMNS` (``event`` is the
    observed outcome, NaN when unknown). Every model is scored on the same
    points: event known and every model has a probability.
    """
    from meterops.backtest import _folds, _freq_text, _iso

    if folds < 1 and test_start is None:
        raise ConfigError(f"folds must be at least 1; got {folds}")
    df = prepare_frame(frame)
    series = _as_event_series(df, target.column)
    spec = features or FeatureSpec()
    freq = spec.resolve_freq(series)
    if spec.freq is None:
        spec = replace(spec, freq=f"{int(freq.total_seconds())}s")
    h = target.steps(freq)
    ts_min, ts_max = df["ts"].min(), df["ts"].max()
    if test_start is not None:
        start = _utc(pd.Series([pd.Timestamp(test_start)])).iloc[0]
        if not ts_min < start <= ts_max:
            raise InputError(f"--test-start {start} is outside the data ({ts_min} .. {ts_max})")
        cuts = [(start, ts_max + freq)]
    else:
        cuts = _folds(ts_min, ts_max, freq, folds, test_fraction, h)
    truth = target.labels(df, freq)
    # "like the last known period": the event of the period ending at the anchor t - h
    truth["persistence"] = truth.groupby("meter_id", sort=False)["event"].shift(h)

    model = EventForecaster(target=target, features=spec, seed=seed, **(params or {}))
    fold_info: list[dict[str, Any]] = []
    parts: list[pd.DataFrame] = []
    thresholds: dict[int, dict[str, float]] = {}
    for i, (origin, end) in enumerate(cuts):
        started = time.perf_counter()
        train = df[df["ts"] < origin]
        upto = df[df["ts"] < end]
        fitted = model.clone().fit(train)
        in_train = (truth["ts"] < origin).to_numpy()
        in_test = ((truth["ts"] >= origin) & (truth["ts"] < end)).to_numpy()
        known_train = in_train & np.isfinite(truth["event"].to_numpy(np.float64))
        y_train = truth["event"].to_numpy(np.float64)[known_train]
        rate = float(y_train.mean()) if len(y_train) else math.nan
        pers_train = truth["persistence"].to_numpy(np.float64)[known_train]
        ok = np.isfinite(pers_train)
        thresholds[i] = {
            "gbm": fitted.threshold_,
            "climatology": best_f1_threshold(y_train, np.full(len(y_train), rate)),
            "persistence": best_f1_threshold(y_train[ok], pers_train[ok]),
        }
        test = truth[in_test]
        pred = fitted.predict_proba(upto, start=origin, end=end)
        parts += [
            pred.assign(model="gbm", fold=i),
            test[["meter_id", "ts"]].assign(probability=rate, model="climatology", fold=i),
            test[["meter_id", "ts"]]
            .assign(probability=test["persistence"].to_numpy())
            .assign(model="persistence", fold=i),
        ]
        fold_info.append(
            {
                "fold": i,
                "train_start": _iso(ts_min),
                "origin": _iso(origin),
                "end": _iso(end),
                "train_rows": len(train),
                "base_rate": rate,
                "thresholds": thresholds[i],
                "best_iteration": fitted.best_iteration_,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        log.info("events fold %d done in %.1fs", i, fold_info[-1]["seconds"])

    preds = pd.concat(parts, ignore_index=True)
    preds = preds.merge(truth[["meter_id", "ts", "event"]], on=["meter_id", "ts"], how="left")
    wide = preds.pivot_table(
        index=["fold", "meter_id", "ts"], columns="model", values="probability"
    )
    common = wide.reindex(columns=list(EVENT_MODELS)).notna().all(axis=1)
    keys = wide.index[common.to_numpy()]
    scored = preds.set_index(["fold", "meter_id", "ts"])
    scored = scored[scored.index.isin(keys)].reset_index()
    scored = scored[np.isfinite(scored["event"].to_numpy(np.float64))]
    models: dict[str, Any] = {}
    per_fold: dict[str, Any] = {}
    for name in EVENT_MODELS:
        part = scored[scored["model"] == name]
        fold_metrics = []
        decided = np.zeros(len(part), dtype=bool)
        for f in fold_info:
            sub = part[part["fold"] == f["fold"]]
            y = sub["event"].to_numpy(np.float64)
            p = sub["probability"].to_numpy(np.float64)
            cut = thresholds[f["fold"]][name]
            fold_metrics.append(event_metrics(y, p, cut))
            decided[(part["fold"] == f["fold"]).to_numpy()] = p >= cut
        per_fold[name] = fold_metrics
        models[name] = _pooled(part, decided, fold_metrics)
    for f in fold_info:
        f["test_points"] = int(((scored["fold"] == f["fold"]) & (scored["model"] == "gbm")).sum())
    document = {
        "target": target.to_dict(),
        "event": str(target),
        "horizon": target.horizon,
        "horizon_steps": h,
        "freq": _freq_text(freq),
        "meters": int(df["meter_id"].nunique()),
        "folds": fold_info,
        "models": models,
        "per_fold": per_fold,
    }
    out = preds[list(EVENT_PREDICTION_COLUMNS)].copy()
    return document, out.reset_index(drop=True)


def _pooled(
    part: pd.DataFrame, decided: npt.NDArray[np.bool_], fold_metrics: list[dict[str, Any]]
) -> dict[str, Any]:
    """Metrics pooled over folds.

    F1 uses each fold's own threshold (``decided``). ROC-AUC is the mean of
    the folds' AUCs weighted by their points: it ranks within a fold, so a
    probability that is constant per fold (climatology) scores 0.5 rather
    than whatever the base rates of the folds happen to rank.
    """
    y = part["event"].to_numpy(np.float64)
    p = part["probability"].to_numpy(np.float64)
    out = event_metrics(y, p)
    out["threshold"] = None  # one per fold, in ``folds``
    aucs = [(m["roc_auc"], m["n"]) for m in fold_metrics if m["roc_auc"] is not None]
    weight = sum(n for _, n in aucs)
    out["roc_auc"] = sum(a * n for a, n in aucs) / weight if weight else None
    flagged, actual = decided, y == 1
    tp = float((flagged & actual).sum())
    fp = float((flagged & ~actual).sum())
    fn = float((~flagged & actual).sum())
    if len(y):
        out["precision"] = tp / (tp + fp) if tp + fp else 0.0
        out["recall"] = tp / (tp + fn) if tp + fn else 0.0
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out
