"""Forecasting models: the conventions in :mod:`.base`, baselines, the global GBM, the online model.

:func:`create` builds a model by its name (the names used in backtest
reports); :data:`MODEL_NAMES` lists them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meterops.errors import ConfigError
from meterops.models.base import FORECAST_COLUMNS, Forecaster
from meterops.models.baselines import Persistence, SeasonalNaive
from meterops.models.gbm import GBMForecaster
from meterops.models.online import DEFAULT_ONLINE_FEATURES, OnlineForecaster

__all__ = [
    "BASELINE_NAMES",
    "FORECAST_COLUMNS",
    "MODEL_NAMES",
    "Forecaster",
    "GBMForecaster",
    "OnlineForecaster",
    "Persistence",
    "SeasonalNaive",
    "create",
]

BASELINE_NAMES = ("persistence", "seasonal_naive_daily", "seasonal_naive_weekly")
MODEL_NAMES = (*BASELINE_NAMES, "gbm", "online")


def create(name: str, **params: Any) -> Forecaster:
    """A new untrained model by report name.

    ``horizons``, ``features`` and ``seed`` are understood by every model;
    other ``params`` go to the GBM and the online model only. Baselines take
    only the data frequency from ``features``; the online model keeps its own
    lean feature set (:data:`~meterops.models.online.DEFAULT_ONLINE_FEATURES`)
    and takes what describes the data from ``features`` (frequency, time
    zone, holidays, covariates). It forecasts one horizon: ``horizons`` may
    name one (default ``1``).
    """
    seed = int(params.pop("seed", 0))
    if name == "gbm":
        return GBMForecaster(seed=seed, **params)
    spec = params.pop("features", None)
    horizons = tuple(params.pop("horizons", None) or (1,))
    if name == "online":
        if len(set(horizons)) > 1:
            raise ConfigError(
                f"the online model forecasts one horizon; got {list(horizons)}"
                " (create one model per horizon)"
            )
        online = None
        if spec is not None:
            online = dataclasses.replace(
                DEFAULT_ONLINE_FEATURES,
                freq=spec.freq,
                timezone=spec.timezone,
                holidays=spec.holidays,
                known_covariates=spec.known_covariates,
                past_covariates=spec.past_covariates,
            )
        return OnlineForecaster(horizon=horizons[0], features=online, seed=seed, **params)
    freq = None if spec is None else spec.freq
    if name == "persistence":
        return Persistence(freq=freq, seed=seed)
    if name == "seasonal_naive_daily":
        return SeasonalNaive(period="1d", freq=freq, seed=seed)
    if name == "seasonal_naive_weekly":
        return SeasonalNaive(period="7d", freq=freq, seed=seed)
    raise ConfigError(f"unknown model {name!r}; valid models are: {', '.join(MODEL_NAMES)}")
