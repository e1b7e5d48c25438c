"""Forecasting models: the conventions in :mod:`.base`, baselines, the global GBM.

:func:`create` builds a model by its name (the names used in backtest
reports); :data:`MODEL_NAMES` lists them.
"""

from __future__ import annotations

from typing import Any

from meterops.errors import ConfigError
from meterops.models.base import FORECAST_COLUMNS, Forecaster
from meterops.models.baselines import Persistence, SeasonalNaive
from meterops.models.gbm import GBMForecaster

__all__ = [
    "BASELINE_NAMES",
    "FORECAST_COLUMNS",
    "MODEL_NAMES",
    "Forecaster",
    "GBMForecaster",
    "Persistence",
    "SeasonalNaive",
    "create",
]

BASELINE_NAMES = ("persistence", "seasonal_naive_daily", "seasonal_naive_weekly")
MODEL_NAMES = (*BASELINE_NAMES, "gbm")


def create(name: str, **params: Any) -> Forecaster:
    """A new untrained model by report name; ``params`` go to the GBM only.

    ``horizons``, ``features`` and ``seed`` are understood by every model.
    """
    seed = int(params.pop("seed", 0))
    if name == "gbm":
        return GBMForecaster(seed=seed, **params)
    freq = None
    spec = params.get("features")
    if spec is not None:
        freq = spec.freq
    if name == "persistence":
        return Persistence(freq=freq, seed=seed)
    if name == "seasonal_naive_daily":
        return SeasonalNaive(period="1d", freq=freq, seed=seed)
    if name == "seasonal_naive_weekly":
        return SeasonalNaive(period="7d", freq=freq, seed=seed)
    raise ConfigError(f"unknown model {name!r}; valid models are: {', '.join(MODEL_NAMES)}")
