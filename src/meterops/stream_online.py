"""Stream scoring with an online champion: the same rows as :mod:`meterops.stream`, no learning.

When the registry's champion is an :class:`~meterops.models.online.OnlineForecaster`
(a merged version logged by :mod:`meterops.online_registry` and promoted by
the gate), the worker scores with :class:`OnlineChampionScorer` instead of
:class:`~meterops.stream.ChampionScorer`. Same interface, same rows, same
rules, per reading ``(m, t)``:

* a forecast for ``t + h`` for every configured horizon ``h`` the model can
  serve from data ``<= t``: an online model forecasts its own horizon ``g``
  steps ahead, so it serves every ``h <= g`` (from data ``<= t + h - g``,
  older than needed, never newer; exactly what ``forecast`` does with it)
  and skips longer horizons with a warning;
* an anomaly score against the reading's own forecast made ``g`` steps
  before it (``g = 1`` for the default model): ``z`` from the 80 % interval,
  ``score = 1 - exp(-z^2 / 2)``, flagged when ``|z| > anomaly_threshold``.

The champion does not learn here: it is the frozen version the registry
holds (one model for the whole group, the same numbers on every worker);
learning happens in the per-partition learners of
:mod:`meterops.online_stream`, which reach the stream as a new champion when
the gate promotes one. So every number depends only on the readings up to
its anchor, never on how the stream was cut into micro-batches.

Feature buffers are this scorer's own (one feature definition,
:class:`~meterops.features.FeatureState`), primed from the store's recent
readings the first time a meter appears, like the GBM scorer's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError
from meterops.features import FeatureState, resolve_horizon
from meterops.models.online import OnlineForecaster
from meterops.settings import ScoringSettings
from meterops.stream import (
    BufferedScorer,
    ChampionScorer,
    LoadedModel,
    ResidualScale,
)

__all__ = ["OnlineChampionScorer", "make_scorer"]

log = logging.getLogger("meterops.stream")

Floats = npt.NDArray[np.float64]


class OnlineChampionScorer(BufferedScorer):
    """Forecasts and anomaly scores of a frozen online champion for micro-batches of readings.

    Raises :class:`ConfigError` for a model that is not a fitted
    :class:`OnlineForecaster` (the worker then stores readings unscored).
    """

    def __init__(self, loaded: LoadedModel, scoring: ScoringSettings) -> None:
        model = loaded.model
        if not isinstance(model, OnlineForecaster) or not model.is_fitted:
            raise ConfigError(
                f"champion {loaded.label} is a {type(model).__name__}; this scorer serves"
                " fitted OnlineForecaster champions"
            )
        self.loaded = loaded
        self.model = model
        self.threshold = scoring.anomaly_threshold
        self.freq: pd.Timedelta = model.freq_
        g = int(model.horizon_)
        served: dict[int, int] = {}
        for text in scoring.horizons:
            h = resolve_horizon(text, self.freq)
            if model.horizon_for_step(h) != g:
                log.warning(
                    "champion %s forecasts %d step(s) ahead; horizon %s (%d steps) skipped",
                    loaded.label,
                    g,
                    text,
                    h,
                )
                continue
            served[h] = g
        self.served = served
        self.anomaly_horizon = model.horizon_for_step(1)
        self.noise = (
            ResidualScale(scoring.noise_window, 3 * scoring.anomaly_threshold)
            if scoring.noise_window
            else None
        )
        self.state = FeatureState(model.spec, self.freq, g, model.covariates_, origin=model.origin_)
        self._primed: set[str] = set()

    # ------------------------------------------------------------------ scoring

    def _forecast(self, ids: npt.NDArray[Any], target: pd.Series, g: int) -> Floats:
        """``(n, 4)``: yhat, q10, q50, q90 for ``target`` from data ``<= target - g``."""
        return self.model.predict_matrix(self.state.feature_matrix(ids, target, g))

    def _forecasts(
        self, ids: npt.NDArray[Any], ts: pd.Series
    ) -> tuple[list[tuple[int, pd.Series, Floats]], Floats]:
        forecasts = []
        for h, g in self.served.items():
            target = ts + self.freq * h
            forecasts.append((h, target, self._forecast(ids, target, g)))
        return forecasts, self._forecast(ids, ts, self.anomaly_horizon)


def make_scorer(
    loaded: LoadedModel, scoring: ScoringSettings, compiled_dir: Path | None = None
) -> ChampionScorer | OnlineChampionScorer:
    """The scorer for a champion of any family the stream serves (GBM or online).

    ``compiled_dir`` is where a GBM champion's compiled boosters are cached.
    Raises :class:`ConfigError` (from the scorer) for any other family.
    """
    if isinstance(loaded.model, OnlineForecaster):
        return OnlineChampionScorer(loaded, scoring)
    return ChampionScorer(loaded, scoring, compiled_dir)
