"""Baselines every candidate must beat: persistence and seasonal-naive.

* :class:`Persistence`: the last reading a forecast could know,
  ``yhat[t] = y[t - h]``.
* :class:`SeasonalNaive`: the same phase of the last period a forecast could
  know, ``yhat[t] = y[t - P * ceil(h / P)]`` (``P`` = 1 day: yesterday at the
  same time for a day-ahead forecast; ``P`` = 7 days: last week).

When that reading is missing the last known reading at or before ``t - h`` is
used, so gaps do not blank out forecasts. Intervals are empirical: the 10/50/90 %
quantiles of each meter's own h-step residuals over the last
``residual_window`` of its training data are added to ``yhat`` (pooled
residuals for meters not seen in training).

>>> import numpy as np, pandas as pd
>>> ts = pd.date_range("2024-01-01", periods=5, freq="h", tz="UTC")
>>> frame = pd.DataFrame({"meter_id": "m", "ts": ts, "value": [1.0, 2, 3, 4, 5]})
>>> Persistence().fit(frame).predict(frame, 1)["yhat"].tolist()
[nan, 1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

import logging
import math
from typing import Self

import numpy as np
import pandas as pd

from meterops.errors import ConfigError
from meterops.features import infer_freq, regularize, resolve_horizon
from meterops.models.base import (
    FORECAST_COLUMNS,
    Forecaster,
    check_history,
    prepare_frame,
    sort_quantiles,
    window,
)
from meterops.settings import parse_duration

__all__ = ["NaiveForecaster", "Persistence", "SeasonalNaive"]

log = logging.getLogger("meterops.models")

_NAMES = {"1d": "seasonal_naive_daily", "7d": "seasonal_naive_weekly"}


class NaiveForecaster(Forecaster):
    """Shared machinery: a backward offset per horizon plus empirical residual quantiles."""

    def __init__(
        self, *, freq: str | None = None, residual_window: str = "56d", seed: int = 0
    ) -> None:
        self.freq = freq
        self.residual_window = residual_window
        self.seed = seed

    def offset(self, horizon: int) -> int:
        """How many steps back the forecast for ``horizon`` reads."""
        raise NotImplementedError

    def fit(self, frame: pd.DataFrame) -> Self:
        df = prepare_frame(frame)
        freq = parse_duration(self.freq) if self.freq else infer_freq(df)
        self.freq_ = freq
        self.origin_ = df["ts"].min()
        self.covariates_: tuple[str, ...] = ()
        grid = regularize(df, freq, self.origin_, ())
        check_history(grid, 1)
        self.offset(1)  # validates the period against the frequency
        self.train_ = grid
        self.residual_steps_ = round(parse_duration(self.residual_window) / freq)
        self._residuals: dict[int, tuple[pd.DataFrame, np.ndarray]] = {}
        return self

    def _point(self, grid: pd.DataFrame, horizon: int) -> np.ndarray:
        meters = grid["meter_id"].to_numpy()
        n = len(grid)
        first = np.r_[True, meters[1:] != meters[:-1]] if n else np.zeros(0, dtype=bool)
        group = np.cumsum(first) - 1
        pos = np.arange(n) - np.flatnonzero(first)[group] if n else np.zeros(0, dtype=np.int64)
        v = grid["value"].to_numpy(np.float64)
        s = self.offset(horizon)
        yhat = np.full(n, np.nan)
        ok = pos >= s
        yhat[ok] = v[np.flatnonzero(ok) - s]
        # Fallback for a missing reading: the last known value at or before t - h.
        filled = pd.Series(v).groupby(group).ffill().to_numpy(np.float64)
        backup = np.full(n, np.nan)
        okh = pos >= horizon
        backup[okh] = filled[np.flatnonzero(okh) - horizon]
        return np.where(np.isnan(yhat), backup, yhat)

    def _residual_quantiles(self, horizon: int) -> tuple[pd.DataFrame, np.ndarray]:
        if horizon not in self._residuals:
            grid = self.train_
            res = grid["value"].to_numpy(np.float64) - self._point(grid, horizon)
            frame = pd.DataFrame({"meter_id": grid["meter_id"].to_numpy(), "r": res})
            last = grid.groupby("meter_id", sort=False)["ts"].transform("max")
            frame = frame[(grid["ts"] > last - self.residual_steps_ * self.freq_).to_numpy()]
            frame = frame.dropna()
            per_meter = frame.groupby("meter_id")["r"].quantile(np.array([0.1, 0.5, 0.9])).unstack()
            per_meter.columns = ["r10", "r50", "r90"]
            pooled = (
                np.quantile(frame["r"].to_numpy(), [0.1, 0.5, 0.9])
                if len(frame)
                else np.full(3, np.nan)
            )
            self._residuals[horizon] = (per_meter, pooled)
        return self._residuals[horizon]

    def predict(
        self,
        frame: pd.DataFrame,
        horizon: int | str,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        self._check_fitted()
        h = resolve_horizon(horizon, self.freq_)
        df = prepare_frame(frame)
        grid = regularize(df, self.freq_, self.origin_, ())
        out = grid[["meter_id", "ts"]].copy()
        out["yhat"] = self._point(grid, h)
        out = window(out, start, end).reset_index(drop=True)
        per_meter, pooled = self._residual_quantiles(h)
        r = per_meter.reindex(out["meter_id"]).to_numpy(np.float64)
        r = np.where(np.isnan(r), pooled[None, :], r) if len(r) else np.zeros((0, 3))
        yhat = out["yhat"].to_numpy(np.float64)
        for j, col in enumerate(("q10", "q50", "q90")):
            out[col] = yhat + r[:, j]
        return sort_quantiles(out)[list(FORECAST_COLUMNS)]

    @property
    def model_name(self) -> str:
        return self.name


class Persistence(NaiveForecaster):
    """``yhat[t] = y[t - h]``: the last reading known when the forecast is made."""

    name = "persistence"

    def offset(self, horizon: int) -> int:
        return horizon


class SeasonalNaive(NaiveForecaster):
    """``yhat[t] = y[t - P * ceil(h / P)]`` for the season ``period`` (``"1d"``, ``"7d"``)."""

    name = "seasonal_naive"

    def __init__(
        self,
        *,
        period: str = "1d",
        freq: str | None = None,
        residual_window: str = "56d",
        seed: int = 0,
    ) -> None:
        super().__init__(freq=freq, residual_window=residual_window, seed=seed)
        self.period = period
        parse_duration(period)

    @property
    def model_name(self) -> str:
        return _NAMES.get(self.period, f"seasonal_naive_{self.period}")

    def offset(self, horizon: int) -> int:
        ratio = parse_duration(self.period) / self.freq_
        steps = round(ratio)
        if steps < 1 or abs(ratio - steps) > 1e-6:
            raise ConfigError(
                f"season {self.period!r} is not a whole number of data steps ({self.freq_})"
            )
        return int(steps * math.ceil(horizon / steps))
