"""Online learning throughput: meterops's micro-batch learner beside River's per-reading loop.

Used by ``meterops bench pipeline``. Both sides read the same frame of
readings in time order and score prequentially (forecast a reading, then
learn it) at the same horizon, with the same features: one
:class:`~meterops.features.FeatureSpec` (:data:`DEFAULT_ONLINE_FEATURES`
with the data frequency unless given), computed by the same
:class:`~meterops.features.FeatureState`.

* :func:`online_rate`: :meth:`OnlineForecaster.predict_learn_many` on
  micro-batches of ``batch_rows`` readings (all meters of a batch in a
  handful of NumPy steps). Timed: the whole loop, DataFrame batch in,
  forecasts out.
* :func:`river_rate`: the reference an online-learning library gives, one
  reading at a time: update the feature state with that one reading,
  compute that row's features, ``predict_one`` then ``learn_one`` of
  ``river.preprocessing.StandardScaler() | river.linear_model.LinearRegression()``
  (SGD step ``1e-3``: River's default ``0.01`` diverges on raw kW targets) on
  the raw features (missing ones left out of the dict). It may run on a
  prefix of the data (``limit_rows``): the rate is per reading. Rows before
  ``skip_rows`` only fill the feature buffers (untimed), so the timed
  readings have full features. ``feature_seconds`` is the part of the time
  spent in the feature state.

``rmse`` is prequential (readings with a known value and a known
persistence forecast ``y[t - h]``, scored before being learned);
``persistence_rmse`` is on the same readings. Nothing here asserts a number.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError
from meterops.features import (
    FeatureSpec,
    FeatureState,
    covariate_columns,
    infer_freq,
    reading_arrays,
    resolve_horizon,
)
from meterops.models.base import prepare_frame
from meterops.models.online import DEFAULT_ONLINE_FEATURES, OnlineForecaster

__all__ = ["RateResult", "online_rate", "river_rate"]

Floats = npt.NDArray[np.float64]
_RIVER_LR = 1e-3  # River's default SGD step (0.01) diverges on raw kW targets


@dataclass(frozen=True)
class RateResult:
    """One side's throughput and prequential accuracy."""

    name: str
    rows: int  # readings processed in the timed loop
    seconds: float
    readings_per_s: float
    scored: int  # readings in rmse
    rmse: float | None
    persistence_rmse: float | None
    feature_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _prepare(
    frame: pd.DataFrame, features: FeatureSpec | None
) -> tuple[pd.DataFrame, FeatureSpec, pd.Timedelta]:
    df = prepare_frame(frame).sort_values("ts", kind="stable").reset_index(drop=True)
    spec = features or DEFAULT_ONLINE_FEATURES
    freq = spec.resolve_freq(df) if spec.freq is not None else infer_freq(df)
    if spec.freq is None:
        spec = dataclasses.replace(spec, freq=f"{int(freq.total_seconds())}s")
    return df, spec, freq


def _persistence(df: pd.DataFrame, steps: int, freq: pd.Timedelta) -> Floats:
    """``y[t - h]`` of every reading of ``df`` (NaN when not read), aligned with ``df``."""
    earlier = df[["meter_id", "ts", "value"]].copy()
    earlier["ts"] = earlier["ts"] + steps * freq
    by_slot = earlier.groupby(["meter_id", "ts"], sort=False)["value"].mean()
    keys = pd.MultiIndex.from_arrays([df["meter_id"], df["ts"]])
    return by_slot.reindex(keys).to_numpy(np.float64)


def _score(
    name: str,
    y: Floats,
    yhat: Floats,
    before: Floats,
    seconds: float,
    feature_seconds: float | None = None,
) -> RateResult:
    ok = np.isfinite(y) & np.isfinite(yhat) & np.isfinite(before)
    m = int(ok.sum())
    rmse = math.sqrt(float(np.mean((y[ok] - yhat[ok]) ** 2))) if m else None
    pers = math.sqrt(float(np.mean((y[ok] - before[ok]) ** 2))) if m else None
    rate = len(y) / seconds if seconds > 0 else math.inf
    return RateResult(name, len(y), seconds, rate, m, rmse, pers, feature_seconds)


def online_rate(
    frame: pd.DataFrame,
    batch_rows: int = 10_000,
    *,
    horizon: int | str = 1,
    features: FeatureSpec | None = None,
) -> RateResult:
    """Readings per second of :meth:`OnlineForecaster.predict_learn_many` over ``frame``."""
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be at least 1, got {batch_rows}")
    df, spec, freq = _prepare(frame, features)
    steps = resolve_horizon(horizon, freq)
    model = OnlineForecaster(horizon=steps, features=spec)
    batches = [df.iloc[i : i + batch_rows] for i in range(0, len(df), batch_rows)]
    parts: list[Floats] = []
    started = time.perf_counter()
    for batch in batches:
        parts.append(model.predict_learn_many(batch))
    seconds = time.perf_counter() - started
    yhat = np.concatenate(parts) if parts else np.zeros(0)
    y = df["value"].to_numpy(np.float64)
    return _score("meterops", y, yhat, _persistence(df, steps, freq), seconds)


def river_rate(
    frame: pd.DataFrame,
    limit_rows: int = 20_000,
    *,
    horizon: int | str = 1,
    features: FeatureSpec | None = None,
    skip_rows: int = 0,
) -> RateResult:
    """Readings per second of River's per-reading loop on the same features (see the module).

    Raises :class:`ConfigError` when River is not installed.
    """
    try:
        from river import linear_model, optim, preprocessing
    except ImportError as exc:  # pragma: no cover - river is in the peers extra
        raise ConfigError("the River reference needs river: pip install 'meterops[peers]'") from exc
    df, spec, freq = _prepare(frame, features)
    steps = resolve_horizon(horizon, freq)
    plan = spec.plan(freq, steps, covariate_columns(df))
    covs = tuple(plan.past) + tuple(c for c in plan.known if c not in plan.past)
    state = FeatureState(spec, freq, steps, covs)
    names = state.names(steps)
    ids, ts_ns, data = reading_arrays(df, covs)
    if skip_rows:
        state.update_arrays(ids[:skip_rows], ts_ns[:skip_rows], data[:skip_rows])
    stop = min(len(df), skip_rows + limit_rows)
    regression = linear_model.LinearRegression(optimizer=optim.SGD(_RIVER_LR))
    model = preprocessing.StandardScaler() | regression
    yhat = np.full(stop - skip_rows, np.nan)
    in_features = 0.0
    started = time.perf_counter()
    for n, i in enumerate(range(skip_rows, stop)):
        t0 = time.perf_counter()
        state.update_arrays(ids[i : i + 1], ts_ns[i : i + 1], data[i : i + 1])
        row = state.feature_matrix(ids[i : i + 1], ts_ns[i : i + 1], steps)[0]
        in_features += time.perf_counter() - t0
        x = {name: float(v) for name, v in zip(names, row, strict=True) if math.isfinite(v)}
        yhat[n] = model.predict_one(x)
        target = float(data[i, 0])
        if math.isfinite(target):
            model.learn_one(x, target)
    seconds = time.perf_counter() - started
    part = df.iloc[skip_rows:stop]
    y = part["value"].to_numpy(np.float64)
    before = _persistence(df, steps, freq)[skip_rows:stop]
    return _score("river", y, yhat, before, seconds, in_features)
