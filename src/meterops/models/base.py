"""Forecaster conventions and the forecast API every model follows.

Estimator conventions (river / scikit-learn style):

* hyper-parameters are keyword arguments of ``__init__``, stored as given,
  under the same names; :meth:`Forecaster.get_params` returns them and
  :meth:`Forecaster.clone` builds an untrained twin from them;
* learned state lives in attributes ending in ``_`` set by :meth:`fit`;
* randomness comes only from ``seed``: same seed, same data, same output.

Data in: a *long frame* of readings, one row per ``(meter_id, ts)`` with
``value`` (NaN = missing) and optional numeric covariates (``label`` and
``_private`` columns are ignored). ``ts`` is UTC (naive is taken as UTC).
Frames are never modified. Readings are put on each meter's regular grid
(:func:`meterops.features.regularize`), so gaps and off-grid times are fine.

Data out: :data:`FORECAST_COLUMNS` = ``meter_id, ts, yhat, q10, q50, q90``:
``yhat`` the point forecast (the conditional mean, what RMSE rewards) and an
80 % central interval ``[q10, q90]`` around the median ``q50``; quantiles never
cross. Two ways to ask:

* :meth:`Forecaster.predict` ``(frame, horizon, start, end)`` -- *as-of*
  forecasts for every grid slot ``t`` of every meter with ``start <= t < end``,
  each made from data at ``<= t - horizon`` only (values in ``frame`` after
  that are ignored by construction). This is what a backtest and a stream
  with a fixed horizon need.
* :meth:`Forecaster.forecast` ``(history, horizon, known)`` -- the next
  ``horizon`` steps after each meter's last reading (``horizon`` rows per
  meter), with known covariates for those future times when given.

Horizons are steps (``1``, ``"1"``) or durations (``"30min"``, ``"24h"``,
``"1d"``) converted with the data frequency learned at fit time.

Errors: :class:`~meterops.errors.InputError` for data that cannot be used
(missing columns, a horizon longer than the history),
:class:`~meterops.errors.ConfigError` for bad hyper-parameters or a horizon
the model was not fitted for. A meter with too little history falls back to
a baseline with a logged warning rather than failing.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from meterops.errors import InputError, NotFound
from meterops.features import _utc, covariate_columns, regularize, resolve_horizon

__all__ = [
    "FORECAST_COLUMNS",
    "QUANTILES",
    "Forecaster",
    "check_history",
    "prepare_frame",
    "sort_quantiles",
    "window",
]

log = logging.getLogger("meterops.models")

FORECAST_COLUMNS = ("meter_id", "ts", "yhat", "q10", "q50", "q90")
QUANTILES = (0.1, 0.5, 0.9)


def prepare_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A private copy of a reading frame with UTC ``ts`` and string ``meter_id``.

    Raises :class:`InputError` when ``ts`` or ``value`` is missing; a frame
    without ``meter_id`` is one meter called ``"series"``.
    """
    missing = [c for c in ("ts", "value") if c not in frame.columns]
    if missing:
        raise InputError(
            f"a reading frame needs columns meter_id, ts, value; missing {', '.join(missing)}"
        )
    out = frame.copy()
    if "meter_id" not in out.columns:
        out.insert(0, "meter_id", "series")
    out["meter_id"] = out["meter_id"].astype(str)
    # the tz-aware array itself: ``Series.to_numpy()`` would box every reading in a Timestamp
    out["ts"] = _utc(out["ts"]).array
    return out


def check_history(grid: pd.DataFrame, horizon: int) -> None:
    """Raise :class:`InputError` when no meter's history is longer than ``horizon`` steps."""
    if grid.empty:
        raise InputError("no readings to learn from")
    longest = int(grid.groupby("meter_id", sort=False).size().max())
    if longest <= horizon:
        raise InputError(
            f"the horizon ({horizon} steps) is longer than the history: the longest meter"
            f" has {longest} steps; use a shorter horizon or more data"
        )


class Forecaster(ABC):
    """Base class of forecasting models (see the module docstring for the contract)."""

    name: ClassVar[str] = "forecaster"

    # ------------------------------------------------------------------ conventions

    def get_params(self) -> dict[str, Any]:
        """The constructor keywords, as given."""
        sig = inspect.signature(type(self).__init__)
        return {
            p.name: getattr(self, p.name)
            for p in sig.parameters.values()
            if p.name != "self" and p.kind == p.KEYWORD_ONLY
        }

    def clone(self) -> Self:
        """An untrained twin with the same hyper-parameters."""
        return type(self)(**self.get_params())

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "freq_")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFound(f"{type(self).__name__} is not fitted yet; call fit(frame) first")

    # ------------------------------------------------------------------ API

    @abstractmethod
    def fit(self, frame: pd.DataFrame) -> Self:
        """Learn from a long frame of readings; returns ``self``.

        Sets at least ``freq_`` (the data step), ``origin_`` (the grid phase)
        and ``covariates_``. Raises :class:`InputError` when the frame holds
        no usable readings or every meter is shorter than the horizon.
        """

    @abstractmethod
    def predict(
        self,
        frame: pd.DataFrame,
        horizon: int | str,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """As-of forecasts for every grid slot ``start <= t < end`` from data ``<= t - horizon``.

        Returns :data:`FORECAST_COLUMNS`, one row per (meter, slot) of the
        regularised ``frame``, sorted by meter and time.
        """

    def horizon_for_step(self, step: int) -> int:
        """The as-of horizon used for the ``step``-th future step in :meth:`forecast`."""
        return step

    def forecast(
        self,
        history: pd.DataFrame,
        horizon: int | str,
        known: pd.DataFrame | None = None,
    ) -> pd.DataFrame:
        """The next ``horizon`` steps after each meter's last reading in ``history``.

        ``known`` may hold ``meter_id, ts`` and known covariates for the future
        slots. Returns :data:`FORECAST_COLUMNS` plus ``step`` (1..horizon),
        exactly ``horizon`` rows per meter.
        """
        self._check_fitted()
        freq: pd.Timedelta = self.freq_  # type: ignore[attr-defined]
        steps = resolve_horizon(horizon, freq)
        hist = prepare_frame(history)
        grid = regularize(hist, freq, self.origin_, self.covariates_)  # type: ignore[attr-defined]
        last = grid.groupby("meter_id", sort=True)["ts"].max()
        meters = np.repeat(last.index.to_numpy(), steps)
        k = np.tile(np.arange(1, steps + 1), len(last))
        future = pd.DataFrame(
            {
                "meter_id": meters,
                "ts": pd.to_datetime(np.repeat(last.to_numpy(), steps), utc=True)
                + pd.to_timedelta(k * freq.value, unit="ns"),
                "value": np.nan,
            }
        )
        if known is not None:
            extra = prepare_frame(known.assign(value=np.nan) if "value" not in known else known)
            cols = [c for c in covariate_columns(extra) if c != "value"]
            future = future.merge(
                extra[["meter_id", "ts", *cols]], on=["meter_id", "ts"], how="left"
            )
        ext = pd.concat([hist, future], ignore_index=True)
        future["step"] = k
        parts = []
        by_h: dict[int, list[int]] = {}
        for s in range(1, steps + 1):
            by_h.setdefault(self.horizon_for_step(s), []).append(s)
        start = future["ts"].min()
        for h, members in by_h.items():
            pred = self.predict(ext, h, start=start)
            want = future[future["step"].isin(members)][["meter_id", "ts", "step"]]
            parts.append(want.merge(pred, on=["meter_id", "ts"], how="left"))
        out = pd.concat(parts, ignore_index=True).sort_values(["meter_id", "ts"])
        return out[[*FORECAST_COLUMNS, "step"]].reset_index(drop=True)


def window(
    pred: pd.DataFrame, start: pd.Timestamp | None, end: pd.Timestamp | None
) -> pd.DataFrame:
    """Rows of ``pred`` with ``start <= ts < end`` (open bounds when None)."""
    mask = np.ones(len(pred), dtype=bool)
    if start is not None:
        mask &= (pred["ts"] >= _utc(pd.Series([start])).iloc[0]).to_numpy()
    if end is not None:
        mask &= (pred["ts"] < _utc(pd.Series([end])).iloc[0]).to_numpy()
    return pred[mask]


def sort_quantiles(frame: pd.DataFrame) -> pd.DataFrame:
    """Quantile columns sorted row-wise so they never cross (NaN stays NaN)."""
    q = frame[["q10", "q50", "q90"]].to_numpy(np.float64)
    ok = ~np.isnan(q).any(axis=1)
    q[ok] = np.sort(q[ok], axis=1)
    frame[["q10", "q50", "q90"]] = q
    return frame
