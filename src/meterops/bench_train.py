"""``bench train``: meterops training its global GBM beside mlforecast (Nixtla) on the same data.

Both sides get the same simulated fleet (``meters`` x ``days`` hourly, with
the shared temperature), the same training cut (everything before the last
``test_days``) and are judged on the same points: every hourly slot ``t`` of
the last ``test_days``, forecast from readings at ``<= t - 24h`` (day ahead).
Each side runs in its own freshly *spawned* process, one after the other, so
its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` read by that process at
its end) is its own: Python, the libraries, the generated fleet (both hold
the same one; ``data_rss_mb`` is the RSS before training starts) and the
training. ``seconds`` is the wall time of training alone (meterops:
``GBMForecaster.fit`` = features + boosters; mlforecast: exogenous features
+ ``MLForecast.fit``); forecasting the test period is timed apart
(``predict_seconds``). Nothing here asserts a number.

The peer, and what is and is not identical
------------------------------------------

Identical:

* the data, the training rows' time range and the scored points;
* the features of :mod:`meterops.features` for horizon 24 h: lags
  24/25/26/48/168/336 h, the seasonal means of 4 past days / 4 past weeks
  (``SeasonalRollingMean`` on lags 24 and 168, ``min_samples=1``), rolling
  mean and sample std over 24 h and 168 h ending at ``t - 24h`` (same minimum
  counts 6 and 42), temperature at ``t - 24h`` and its 24 h rolling mean
  (``transform_exog``), hour / day of week / month of ``t`` (UTC);
* the per-meter standardisation: meterops scales target and level features
  by each meter's training mean and std, mlforecast's ``LocalStandardScaler``
  scales the target before its lags are taken -- the same numbers up to the
  std's ``ddof`` (1 vs 0: a factor ``sqrt(n / (n - 1))``, negligible);
* the booster set and its hyper-parameters: four LightGBM models per side
  (L2 for ``yhat``, quantile 0.1 / 0.5 / 0.9), the same learning rate,
  leaves, ``min_data_in_leaf``, feature / bagging fractions, L2
  regularisation, seed, threads, ``deterministic`` and ``force_row_wise``;
  each peer model gets exactly as many trees as meterops's final booster for
  the same target (``trees``);
* the strategy: direct, one model for the 24 h horizon. Every feature reads
  values at least 24 h old, so mlforecast's recursive ``predict(24)`` never
  feeds a prediction back: it *is* the direct forecast. It is run once per
  test day with ``update`` adding that day's actuals, as meterops's rolling
  ``predict(start=...)`` sees them.

Not identical:

* meterops trains twice: first on the earliest 80 % with early stopping on
  the last 20 % and a conformal shift of the quantiles, then the mean model
  alone on everything with the found rounds x 1.25 (the quantile boosters
  are the calibration-pass ones). Above ``GBMForecaster.max_train_rows``
  (1 M) / ``quantile_rows`` (0.5 M) training rows, meterops boosts on a sample
  stratified by meter and time (the full-size fleet does); the peer has no
  such cap. mlforecast has no calibration pass (its conformal intervals
  refit per window), so the peer trains once, on every row, with the trees
  meterops ended up with, and its quantiles are uncalibrated (compare
  ``coverage_80``);
* meterops has ``lag0`` and ``season1d_0`` as two columns holding the same
  value (both ``y[t - 24h]``); mlforecast takes a lag once (19 vs 20
  columns, which only shifts ``feature_fraction`` sampling);
* meterops drops each meter's first 24 rows (no reading-based feature yet);
  mlforecast (``dropna=False``) keeps them with NaN features.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["TARGET_RSS_MB", "TARGET_SECONDS", "bench_train", "fleet_readings"]

TARGET_SECONDS = 180.0
TARGET_RSS_MB = 8192.0
_HORIZON = 24  # steps of one hour: day ahead, the GBM's default serving horizon here
_TARGETS = ("yhat", "q10", "q50", "q90")


def fleet_readings(meters: int, days: float, seed: int = 0) -> pd.DataFrame:
    """The simulated fleet, hourly from 2024-01-01: ``meter_id, ts, value, temperature``."""
    from meterops.sources.simulator import FleetSpec, simulate

    spec = FleetSpec(meters=meters, periods=max(1, round(days * 24)), freq="1h", seed=seed)
    return simulate(spec).readings.drop(columns=["label"])


def _peak_rss_mb() -> float:
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def _split(
    frame: pd.DataFrame, test_days: float, ts: str = "ts"
) -> tuple[pd.Timestamp, pd.DataFrame]:
    test_start = frame[ts].max() + pd.Timedelta("1h") - pd.Timedelta(days=test_days)
    return test_start, frame[frame[ts] < test_start]


def _lgb_params(n_jobs: int, seed: int) -> dict[str, Any]:
    """The GBMForecaster hyper-parameters, spelled for the scikit-learn ``LGBMRegressor``."""
    from meterops.models.gbm import GBMForecaster

    gbm = GBMForecaster(n_jobs=n_jobs, seed=seed)
    return {
        "learning_rate": gbm.learning_rate,
        "num_leaves": gbm.num_leaves,
        "min_child_samples": gbm.min_child_samples,
        "colsample_bytree": gbm.colsample,
        "subsample": gbm.subsample,
        "subsample_freq": 1 if gbm.subsample < 1 else 0,
        "reg_lambda": gbm.reg_lambda,
        "random_state": gbm.seed,
        "n_jobs": gbm.n_jobs,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


def _meterops_side(
    meters: int, days: float, test_days: float, n_jobs: int, n_estimators: int, seed: int
) -> dict[str, Any]:
    """Child process: fit GBMForecaster for 24 h, forecast the test days."""
    from meterops.models.gbm import GBMForecaster

    frame = fleet_readings(meters, days, seed)
    test_start, train = _split(frame, test_days)
    data_rss = _rss_mb()
    model = GBMForecaster(horizons=("24h",), n_estimators=n_estimators, n_jobs=n_jobs, seed=seed)
    started = time.perf_counter()
    model.fit(train)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    pred = model.predict(frame, _HORIZON, start=test_start)
    predict_seconds = time.perf_counter() - started
    boosters = model.boosters_.get(_HORIZON, {})
    return {
        "seconds": seconds,
        "predict_seconds": predict_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "data_rss_mb": data_rss,
        "train_rows": len(train),
        "trees": {t: int(b.num_trees()) for t, b in boosters.items()},
        "forecast": pred[["meter_id", "ts", "yhat", "q10", "q50", "q90"]],
    }


def _peer_exog(frame: pd.DataFrame) -> pd.DataFrame:
    """Temperature at ``t - 24h`` and its 24 h mean, as meterops's past covariate features."""
    from mlforecast.feature_engineering import transform_exog
    from mlforecast.lag_transforms import RollingMean

    exog = transform_exog(
        frame[["unique_id", "ds", "temperature"]],
        lags=[_HORIZON],
        lag_transforms={_HORIZON: [RollingMean(window_size=24, min_samples=6)]},
    )
    return exog.drop(columns=["temperature"])


def _peer_side(
    meters: int,
    days: float,
    test_days: float,
    n_jobs: int,
    trees: dict[str, int],
    seed: int,
) -> dict[str, Any]:
    """Child process: the same features and boosters through mlforecast, same test points."""
    from lightgbm import LGBMRegressor
    from mlforecast import MLForecast
    from mlforecast.lag_transforms import RollingMean, RollingStd, SeasonalRollingMean
    from mlforecast.target_transforms import LocalStandardScaler

    frame = fleet_readings(meters, days, seed).rename(
        columns={"meter_id": "unique_id", "ts": "ds", "value": "y"}
    )
    frame["ds"] = frame["ds"].dt.tz_localize(None)  # UTC wall clock: same calendar features
    test_start, train = _split(frame, test_days, "ds")
    data_rss = _rss_mb()
    params = _lgb_params(n_jobs, seed)
    objectives: dict[str, dict[str, Any]] = {
        "yhat": {"objective": "regression"},
        "q10": {"objective": "quantile", "alpha": 0.1},
        "q50": {"objective": "quantile", "alpha": 0.5},
        "q90": {"objective": "quantile", "alpha": 0.9},
    }
    models = {
        t: LGBMRegressor(n_estimators=max(1, trees[t]), **params, **objectives[t])
        for t in _TARGETS
        if t in trees
    }
    started = time.perf_counter()
    exog = _peer_exog(frame)
    fcst = MLForecast(
        models=models,
        freq="h",
        lags=[24, 25, 26, 48, 168, 336],
        lag_transforms={
            24: [
                SeasonalRollingMean(season_length=24, window_size=4, min_samples=1),
                RollingMean(window_size=24, min_samples=6),
                RollingStd(window_size=24, min_samples=6),
                RollingMean(window_size=168, min_samples=42),
                RollingStd(window_size=168, min_samples=42),
            ],
            168: [SeasonalRollingMean(season_length=168, window_size=4, min_samples=1)],
        },
        date_features=["hour", "dayofweek", "month"],
        target_transforms=[LocalStandardScaler()],
        num_threads=n_jobs,
    )
    train_exog = train[["unique_id", "ds", "y"]].merge(exog, on=["unique_id", "ds"])
    fcst.fit(train_exog, static_features=[], dropna=False)
    seconds = time.perf_counter() - started

    started = time.perf_counter()
    parts: list[pd.DataFrame] = []
    origin = test_start
    end = frame["ds"].max() + pd.Timedelta("1h")
    while origin < end:
        stop = min(origin + pd.Timedelta(hours=_HORIZON), end)
        steps = int((stop - origin) / pd.Timedelta("1h"))
        x_df = exog[(exog["ds"] >= origin) & (exog["ds"] < stop)]
        parts.append(fcst.predict(steps, X_df=x_df))
        actual = frame[(frame["ds"] >= origin) & (frame["ds"] < stop)]
        fcst.update(actual[["unique_id", "ds", "y"]])
        origin = stop
    predict_seconds = time.perf_counter() - started
    pred = pd.concat(parts, ignore_index=True).rename(columns={"unique_id": "meter_id"})
    pred["ts"] = pred["ds"].dt.tz_localize("UTC")
    return {
        "seconds": seconds,
        "predict_seconds": predict_seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "data_rss_mb": data_rss,
        "train_rows": len(train),
        "forecast": pred[["meter_id", "ts", *models]],
    }


def _in_child(func: Any, *args: Any) -> dict[str, Any]:
    """Run ``func(*args)`` in a fresh spawned process, so its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        result: dict[str, Any] = pool.submit(func, *args).result()
    return result


def _score(
    truth: pd.DataFrame, ours: pd.DataFrame, peer: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of both forecasts on the points where the actual and both forecasts exist."""
    from meterops.backtest import metrics

    key = ["meter_id", "ts"]
    joined = truth[[*key, "value"]].merge(ours, on=key).merge(peer, on=key, suffixes=("", "_peer"))
    cols = ["value", "yhat", "yhat_peer"]
    joined = joined[np.isfinite(joined[cols].to_numpy(np.float64)).all(axis=1)]

    def side(suffix: str) -> dict[str, Any]:
        quantiles = [f"{q}{suffix}" for q in ("q10", "q50", "q90")]
        q = [joined[c].to_numpy(np.float64) if c in joined else None for c in quantiles]
        return metrics(joined["value"].to_numpy(np.float64), joined[f"yhat{suffix}"], *q)

    return side(""), side("_peer")


def bench_train(
    meters: int = 1_000,
    days: float = 365.0,
    *,
    test_days: float = 14.0,
    n_jobs: int | None = None,
    n_estimators: int = 600,
    seed: int = 0,
) -> dict[str, Any]:
    """Train meterops's GBM and the mlforecast peer on the same fleet; returns the numbers.

    ``n_jobs`` (default: every core) is the LightGBM thread count of both
    sides; ``n_estimators`` caps meterops's rounds (the peer gets the rounds
    meterops ended with). Raises :class:`~meterops.errors.InputError` when
    the fleet is too short for the test period and a day-ahead history.
    """
    from meterops.errors import InputError

    if days - test_days < 7:
        raise InputError(
            f"{days} days leave less than a week of training before the {test_days} test days;"
            " use more --days or fewer --test-days"
        )
    jobs = n_jobs or os.cpu_count() or 1
    ours = _in_child(_meterops_side, meters, days, test_days, jobs, n_estimators, seed)
    peer = _in_child(_peer_side, meters, days, test_days, jobs, ours["trees"], seed)
    truth = fleet_readings(meters, days, seed)
    mine, theirs = _score(truth, ours.pop("forecast"), peer.pop("forecast"))
    seconds, peer_seconds = ours["seconds"], peer["seconds"]
    import lightgbm
    import mlforecast

    return {
        "benchmark": "train",
        "meters": meters,
        "days": days,
        "rows": len(truth),
        "train_rows": ours["train_rows"],
        "horizon": "24h",
        "test_days": test_days,
        "test_points": mine["n"],
        "n_jobs": jobs,
        "cores": os.cpu_count(),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "rmse": mine["rmse"],
        "coverage_80": mine["coverage_80"],
        "peer_seconds": round(peer_seconds, 2),
        "peer_peak_rss_mb": round(peer["peak_rss_mb"], 1),
        "peer_rmse": theirs["rmse"],
        "peer_coverage_80": theirs["coverage_80"],
        "ratio": round(seconds / peer_seconds, 3) if peer_seconds > 0 else None,
        "trees": ours["trees"],
        "target": {"seconds": TARGET_SECONDS, "peak_rss_mb": TARGET_RSS_MB},
        "within_target": bool(seconds <= TARGET_SECONDS and ours["peak_rss_mb"] <= TARGET_RSS_MB),
        "meterops": {**_rounded(ours), "metrics": mine},
        "peer": {"name": "mlforecast", **_rounded(peer), "metrics": theirs},
        "versions": {"lightgbm": lightgbm.__version__, "mlforecast": mlforecast.__version__},
    }


def _rounded(side: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in side.items()}
