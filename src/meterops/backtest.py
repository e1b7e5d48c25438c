"""Rolling-origin backtests: every model on the same folds, judged on the same points.

Two ways to cut the data:

* ``folds=k`` (default 3): the last ``test_fraction`` of the time span is cut
  into ``k`` consecutive folds; for each fold every model is trained on the
  readings *before* the fold's origin and forecasts every slot ``t`` of the
  fold from data at ``<= t - horizon`` (the fold's own readings become
  available as time passes, the model does not change) -- exactly how a
  model serves between two retrainings.
* ``test_start=TS``: one fold, training on everything before ``TS`` and
  forecasting every later slot the same way.

The horizon is a number of steps, a duration, or a day-ahead horizon
``day-ahead@HH:MM`` (:mod:`meterops.dayahead`): every slot ``t`` is then
forecast from the data up to the cutoff ``HH:MM`` (local time of the feature
time zone) of the day before ``t``'s local day, so the lead varies per slot
(14 .. 37 steps for hourly data and a 10:00 cutoff). The baselines serve each
lead with their own as-of rule (``predict`` with that lead); the GBM has one
model for all leads (see :mod:`meterops.models.gbm`); any other candidate
(the online model) is fitted for the longest lead and serves every slot
from that far back (older data than the cutoff allows, never newer).
``horizon_steps`` is then the longest lead and ``day_ahead`` gives the
cutoff, the time zone and the lead range.

``selected`` is the model meterops itself would serve, chosen per fold from
the training data only: the candidates are compared by RMSE on the last part
of the training period (the GBM's calibration hold-out, whose boosters never
saw it as training data; baselines are refitted before it), the best one's
test forecasts are reported as ``selected``.

Metrics (per model, pooled over folds and per fold) are computed on the
points where the actual is known and every model has a forecast, so every
number compares like with like: RMSE, MAE, sMAPE (%, 0 when actual and
forecast are both 0), MAPE (%, points with a zero actual skipped), pinball
loss (mean over q10/q50/q90) and ``coverage_80`` (share of actuals in
``[q10, q90]``).

>>> metrics(np.array([1.0, 2.0]), np.array([1.0, 4.0]))["rmse"]
1.4142135623730951
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.dayahead import DayAhead, parse_horizon, predict_by_lead
from meterops.errors import ConfigError, InputError
from meterops.features import FeatureSpec, _utc, regularize, resolve_horizon
from meterops.models import MODEL_NAMES, Forecaster, create
from meterops.models.base import prepare_frame
from meterops.models.baselines import NaiveForecaster
from meterops.models.gbm import GBMForecaster

__all__ = ["DEFAULT_MODELS", "PREDICTION_COLUMNS", "metrics", "predict_as_of", "run_backtest"]

log = logging.getLogger("meterops.backtest")

DEFAULT_MODELS = MODEL_NAMES
PREDICTION_COLUMNS = ("meter_id", "ts", "model", "yhat", "q10", "q90")
Floats = npt.NDArray[np.float64]


def metrics(
    y: Floats,
    yhat: Floats,
    q10: Floats | None = None,
    q50: Floats | None = None,
    q90: Floats | None = None,
) -> dict[str, float | int | None]:
    """Point and interval metrics of forecasts against actuals (NaN-free arrays).

    ``pinball`` and ``coverage_80`` are ``None`` without quantiles.

    >>> m = metrics(np.array([0.0, 2.0]), np.array([1.0, 2.0]))
    >>> m["mae"], m["smape"], m["mape"]
    (0.5, 100.0, 0.0)
    """
    y = np.asarray(y, dtype=np.float64)
    yhat = np.asarray(yhat, dtype=np.float64)
    n = len(y)
    if n == 0:
        return {
            "n": 0,
            "rmse": None,
            "mae": None,
            "smape": None,
            "mape": None,
            "pinball": None,
            "coverage_80": None,
        }
    err = y - yhat
    denom = np.abs(y) + np.abs(yhat)
    smape_terms = np.where(denom > 0, 2 * np.abs(err) / np.where(denom > 0, denom, 1), 0.0)
    nonzero = np.abs(y) > 1e-12
    mape = (
        float(np.mean(np.abs(err[nonzero]) / np.abs(y[nonzero])) * 100) if nonzero.any() else None
    )
    out: dict[str, float | int | None] = {
        "n": n,
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "smape": float(np.mean(smape_terms) * 100),
        "mape": mape,
        "pinball": None,
        "coverage_80": None,
    }
    if q10 is not None and q50 is not None and q90 is not None:
        losses = []
        for q, pred in ((0.1, q10), (0.5, q50), (0.9, q90)):
            d = y - np.asarray(pred, dtype=np.float64)
            losses.append(np.mean(np.maximum(q * d, (q - 1) * d)))
        out["pinball"] = float(np.mean(losses))
        out["coverage_80"] = float(np.mean((y >= q10) & (y <= q90)))
    return out


def _folds(
    ts_min: pd.Timestamp,
    ts_max: pd.Timestamp,
    freq: pd.Timedelta,
    folds: int,
    test_fraction: float,
    horizon: int,
) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    span = ts_max - ts_min
    test_len = span * test_fraction
    fold_len = freq * int(test_len / folds // freq) if folds else pd.Timedelta(0)
    if fold_len < freq * max(horizon, 1):
        raise InputError(
            f"the data ({span}) is too short for {folds} folds of at least the horizon"
            f" ({horizon} steps of {freq}); use fewer folds, a shorter horizon or --test-start"
        )
    end = ts_max + freq
    starts = [end - fold_len * (folds - i) for i in range(folds)]
    return [(s, s + fold_len if i < folds - 1 else end) for i, s in enumerate(starts)]


Horizon = int | DayAhead


def predict_as_of(
    model: Forecaster,
    frame: pd.DataFrame,
    horizon: Horizon,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    longest: int | None = None,
) -> pd.DataFrame:
    """``model.predict`` for a horizon in steps or a day-ahead horizon (any model).

    Day-ahead: the GBM serves it natively, a baseline serves each lead by
    its own rule (:func:`~meterops.dayahead.predict_by_lead`); any other
    model serves every slot with its horizon ``longest`` (the longest lead:
    older data than the cutoff allows, never newer).
    """
    if not isinstance(horizon, DayAhead):
        return model.predict(frame, horizon, start=start, end=end)
    if isinstance(model, GBMForecaster):
        return model.predict(frame, horizon.text, start=start, end=end)
    fitted: Any = model
    if isinstance(model, NaiveForecaster) or longest is None:
        return predict_by_lead(
            model.predict, frame, horizon, fitted.freq_, fitted.origin_, start, end
        )
    return model.predict(frame, longest, start=start, end=end)


def _model_params(
    name: str, horizon: Horizon, longest: int, params: dict[str, Any]
) -> dict[str, Any]:
    """``create`` keywords of model ``name`` for ``horizon`` (``longest``: its longest lead)."""
    if isinstance(horizon, DayAhead):
        fitted: int | str = horizon.text if name == "gbm" else longest
    else:
        fitted = horizon
    return {**params, "horizons": (fitted,)}


def _validation(gbm: GBMForecaster, horizon: Horizon) -> tuple[pd.DataFrame, pd.Timestamp] | None:
    """The GBM's hold-out predictions of ``horizon`` and where its hold-out starts."""
    if isinstance(horizon, DayAhead):
        model = getattr(gbm, "day_ahead_", {}).get(horizon.text)
        if model is None or model.validation is None or model.calibration_start is None:
            return None
        return model.validation, model.calibration_start
    if horizon not in gbm.validation_:
        return None
    return gbm.validation_[horizon], gbm.calibration_start_[horizon]


def _selection(
    train: pd.DataFrame,
    fitted: dict[str, Any],
    h: Horizon,
    longest: int,
    params: dict[str, Any],
) -> tuple[str, dict[str, float]]:
    """The candidate with the lowest RMSE on the last part of the training period."""
    gbm = fitted.get("gbm")
    held = _validation(gbm, h) if isinstance(gbm, GBMForecaster) else None
    if held is not None:
        val_start = held[1]
    else:
        lo, hi = train["ts"].min(), train["ts"].max()
        val_start = lo + (hi - lo) * 0.8
    val_preds: dict[str, pd.DataFrame] = {}
    early = train[train["ts"] <= val_start]
    for name, model in fitted.items():
        if isinstance(model, GBMForecaster):
            if held is None:
                continue
            pred = held[0]
        else:
            try:
                model = create(name, **_model_params(name, h, longest, params)).fit(early)
                pred = predict_as_of(model, train, h, start=val_start, longest=longest)
            except InputError:
                continue
        val_preds[name] = pred
    if not val_preds:
        return next(iter(fitted)), {}
    truth = train[["meter_id", "ts", "value"]]
    joined = None
    for name, pred in val_preds.items():
        part = pred[["meter_id", "ts", "yhat"]].rename(columns={"yhat": name})
        joined = part if joined is None else joined.merge(part, on=["meter_id", "ts"], how="inner")
    assert joined is not None  # noqa: S101
    joined = joined.merge(truth, on=["meter_id", "ts"], how="inner").dropna()
    if joined.empty:
        return next(iter(fitted)), {}
    scores = {
        name: float(np.sqrt(np.mean((joined["value"] - joined[name]) ** 2))) for name in val_preds
    }
    return min(scores, key=lambda k: scores[k]), scores


def run_backtest(
    frame: pd.DataFrame,
    horizon: int | str,
    test_start: pd.Timestamp | str | None = None,
    folds: int = 3,
    models: Sequence[str] | None = None,
    *,
    features: FeatureSpec | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    gbm_params: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Backtest ``models`` (default: every baseline and the GBM, plus ``selected``).

    Returns the metrics document (``horizon``, ``horizon_steps``, ``freq``,
    ``folds`` with their origins and selected model, ``models`` with pooled
    metrics, ``per_fold``) and the predictions with :data:`PREDICTION_COLUMNS`
    for every evaluated point and model. Raises :class:`InputError` for data
    too short for the folds or the horizon, :class:`ConfigError` for unknown
    models or bad arguments.
    """
    names = list(models) if models is not None else list(DEFAULT_MODELS)
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown model(s) {unknown}; valid models are: {', '.join(MODEL_NAMES)}")
    if folds < 1 and test_start is None:
        raise ConfigError(f"folds must be at least 1; got {folds}")
    df = prepare_frame(frame)
    df = df[df["meter_id"].notna()]
    if df.empty or not np.isfinite(pd.to_numeric(df["value"], errors="coerce")).any():
        raise InputError("no finite readings to backtest")
    spec = features or FeatureSpec()
    freq = spec.resolve_freq(df)
    if spec.freq is None:
        spec = replace(spec, freq=f"{int(freq.total_seconds())}s")
    ts_min, ts_max = df["ts"].min(), df["ts"].max()
    day_ahead = parse_horizon(horizon, spec.timezone)
    served: Horizon
    if day_ahead is None:
        h = resolve_horizon(horizon, freq)
        served = h
    else:
        leads = day_ahead.lead_range(ts_min, ts_max, freq, ts_min)
        h = leads[1]  # the longest lead sizes the folds and the history check
        served = day_ahead
    if test_start is not None:
        start = _utc(pd.Series([pd.Timestamp(test_start)])).iloc[0]
        if not ts_min < start <= ts_max:
            raise InputError(f"--test-start {start} is outside the data ({ts_min} .. {ts_max})")
        cuts = [(start, ts_max + freq)]
    else:
        cuts = _folds(ts_min, ts_max, freq, folds, test_fraction, h)
    params: dict[str, Any] = {"features": spec, "seed": seed}
    truth = regularize(df, freq, ts_min, ())[["meter_id", "ts", "value"]]

    fold_info: list[dict[str, Any]] = []
    all_preds: list[pd.DataFrame] = []
    for i, (origin, end) in enumerate(cuts):
        train = df[df["ts"] < origin]
        upto = df[df["ts"] < end]
        info: dict[str, Any] = {
            "fold": i,
            "train_start": _iso(ts_min),
            "origin": _iso(origin),
            "end": _iso(end),
            "train_rows": len(train),
        }
        fitted: dict[str, Any] = {}
        fold_preds: dict[str, pd.DataFrame] = {}
        timings: dict[str, float] = {}
        for name in names:
            started = time.perf_counter()
            extra = (gbm_params or {}) if name == "gbm" else {}
            model = create(name, **_model_params(name, served, h, params), **extra).fit(train)
            pred = predict_as_of(model, upto, served, start=origin, end=end, longest=h)
            timings[name] = round(time.perf_counter() - started, 3)
            fitted[name] = model
            fold_preds[name] = pred.assign(model=name, fold=i)
            all_preds.append(fold_preds[name])
            log.info("fold %d: %s done in %.1fs", i, name, timings[name])
        chosen, scores = _selection(train, fitted, served, h, params)
        all_preds.append(fold_preds[chosen].assign(model="selected"))
        info.update(selected=chosen, validation_rmse=scores, seconds=timings)
        fold_info.append(info)

    preds = pd.concat(all_preds, ignore_index=True)
    preds = preds.merge(truth, on=["meter_id", "ts"], how="left")
    report_names = [*names, "selected"]
    # Judge every model on the same points: actual known and every model has a forecast.
    wide = preds.pivot_table(index=["fold", "meter_id", "ts"], columns="model", values="yhat")
    common = wide.notna().all(axis=1)
    keys = wide.index[common.to_numpy()]
    scored = preds.set_index(["fold", "meter_id", "ts"])
    scored = scored[scored.index.isin(keys)].reset_index()
    scored = scored[np.isfinite(scored["value"].to_numpy(np.float64))]
    result_models: dict[str, Any] = {}
    per_fold: dict[str, Any] = {}
    for name in report_names:
        part = scored[scored["model"] == name]
        result_models[name] = _metrics_of(part)
        per_fold[name] = [_metrics_of(part[part["fold"] == f["fold"]]) for f in fold_info]
    for f in fold_info:
        f["test_points"] = int(
            ((scored["fold"] == f["fold"]) & (scored["model"] == "selected")).sum()
        )
    document = {
        "horizon": str(horizon),
        "horizon_steps": h,
        "freq": _freq_text(freq),
        "meters": int(df["meter_id"].nunique()),
        "folds": fold_info,
        "models": result_models,
        "per_fold": per_fold,
    }
    if day_ahead is not None:
        document["day_ahead"] = {
            "cutoff": day_ahead.cutoff.strftime("%H:%M"),
            "timezone": day_ahead.timezone,
            "lead_steps": list(leads),
        }
    out = preds[["meter_id", "ts", "model", "yhat", "q10", "q90"]].copy()
    return document, out.reset_index(drop=True)


def _metrics_of(part: pd.DataFrame) -> dict[str, float | int | None]:
    return metrics(
        part["value"].to_numpy(np.float64),
        part["yhat"].to_numpy(np.float64),
        part["q10"].to_numpy(np.float64),
        part["q50"].to_numpy(np.float64),
        part["q90"].to_numpy(np.float64),
    )


def _iso(ts: pd.Timestamp) -> str:
    return pd.Timestamp(ts).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def _freq_text(freq: pd.Timedelta) -> str:
    seconds = int(freq.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
