"""Stream scoring: the champion forecasts and judges every valid reading a worker stores.

For each micro-batch of valid readings the :class:`ChampionScorer` keeps the
per-meter feature buffers of the one feature definition
(:class:`~meterops.features.FeatureState`) and, per reading ``(m, t)``:

* issues a forecast for ``t + h`` for every configured horizon ``h``, with its
  10/50/90 % quantiles, from data ``<= t`` only (the as-of model of the
  smallest fitted horizon ``>= h`` serves it, exactly as in a backtest);
* scores the reading against its own one-step forecast (made from data
  ``<= t - 1``): ``z = (y - yhat) / sigma`` with ``sigma`` the 80 % interval
  width over 2.563 (the width of a normal's 80 % interval in sigmas);
  ``score = 1 - exp(-z^2 / 2)`` (0 on the forecast, 0.39 at one sigma, 0.9997
  at four: a bounded score that ranks like ``|z|``) and the reading is an
  anomaly when ``|z| > threshold``.

Every row records the model version that made it and the reading's bus
position (``source``, ``offset``): lineage. The worker stores the rows in the
same transaction as the readings; a redelivered batch is scored again but the
store keeps the first verdict, so each reading is scored exactly once.

Feature buffers are rebuilt from the store: the first time a meter appears,
its recent readings (as many slots as the deepest feature reads) are loaded
before the batch is scored. The buffers are therefore always "the last
readings in the store", whichever worker wrote them, which is what keeps a
restarted or rebalanced worker's features right without any checkpoint of its
own. Given a ``compiled_dir``, the champion's boosters are compiled to
native code in the background (:mod:`meterops.models.compiled`) and serve
once ready. :class:`ChampionWatcher` polls the registry's ``champion`` alias in a
thread and hands a newly promoted model to the worker, which switches between
two micro-batches (hot reload, no restart).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from meterops.errors import ConfigError, MeterOpsError
from meterops.features import FeatureState, resolve_horizon
from meterops.models.base import Forecaster
from meterops.models.compiled import CompiledBoosters
from meterops.models.gbm import GBMForecaster
from meterops.settings import ScoringSettings, Settings
from meterops.store.base import RecentReadings
from meterops.types import PREDICTION_SCHEMA, SCORE_SCHEMA, TS_TYPE, ReadingBatch

__all__ = [
    "BufferedScorer",
    "ChampionScorer",
    "ChampionWatcher",
    "LoadedModel",
    "ResidualScale",
    "anomaly_scores",
]

log = logging.getLogger("meterops.stream")

Floats = npt.NDArray[np.float64]
_SIGMAS_80 = 2.0 * 1.2815515655446004  # width of a normal's 80 % interval, in sigmas
_MISS_80 = 0.2  # how often a calibrated 80 % interval misses


@dataclass(frozen=True)
class LoadedModel:
    """A registry model version ready to score (``label`` goes into every row it makes)."""

    version: int
    label: str
    model: Forecaster


def anomaly_scores(
    y: Floats,
    forecast: Floats,
    threshold: float,
    scale: ResidualScale | None = None,
    ids: npt.NDArray[Any] | None = None,
) -> tuple[Floats, npt.NDArray[np.bool_], Floats, Floats]:
    """Score, flag, model sigma and interval widening of each reading against its
    forecast (yhat, q10, q50, q90).

    ``z = |y - yhat| / sigma`` with sigma from the 80 % interval, divided by
    the meter's own residual scale when ``scale`` is given (``ids`` aligned
    with ``y``, rows in time order per meter); the score is
    ``1 - exp(-z^2 / 2)`` (NaN without a usable interval), the flag
    ``z > threshold``. The widening (1 without ``scale``) is what the meter's
    intervals issued at that reading are widened by (:meth:`ResidualScale.scales`).
    """
    sigma = (forecast[:, 3] - forecast[:, 1]) / _SIGMAS_80
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(y - forecast[:, 0]) / sigma
    ok = np.isfinite(z) & (sigma > 0)
    widen = np.ones(len(y))
    if scale is not None and ids is not None:
        z_scale, widen = scale.scales(ids, np.where(ok, z, np.nan))
        z = z / z_scale
    score = np.where(ok, -np.expm1(-0.5 * np.where(ok, z, 0.0) ** 2), np.nan)
    return score, ok & (z > threshold), sigma, widen


def _widened(forecast: Floats, widen: Floats) -> Floats:
    """``forecast`` (yhat, q10, q50, q90) with q10 and q90 moved away from q50 by ``widen``
    (a copy: the one-step forecasts kept for judging stay the model's)."""
    if not (widen > 1).any():
        return forecast
    out = forecast.copy()
    for col in (1, 3):
        out[:, col] = forecast[:, 2] + widen * (forecast[:, col] - forecast[:, 2])
    return out


class ResidualScale:
    """How much noisier each meter is than the model's intervals say, from its own residuals.

    Why: intervals are calibrated on the fleet the champion was trained on.
    A meter it never saw (the real household replayed in the demo) can be
    much noisier relative to its level, and then a fixed threshold flags one
    reading in eight. Each reading's ``z`` is divided by
    ``sqrt(max(1, s2))``, with ``s2`` the mean of the meter's last
    ``window`` squared one-step ``z`` (each capped at ``cap^2`` so anomalies
    cannot hide the next ones; the scorers use three times the threshold,
    because a cap at the threshold itself cut ordinary noise of a meter eight
    times noisier than the fleet and left it under-scaled), shrunk towards 1
    by ``prior`` pseudo-readings.
    It only widens: a meter as calm as the fleet keeps the model's intervals.

    The same windows also count how often the meter's readings fell outside
    the model's 80 % interval (``|z| > 1.28``), shrunk towards 20 % by the same
    ``prior``. When that miss rate is clearly above one in five (its value
    less two standard errors still is), the intervals issued at a reading are
    widened around q50 by the same ``sqrt(s2)``; otherwise they stay the
    model's. The gate is the miss rate because heavy tails alone inflate
    ``s2`` but not the miss rate of a calibrated interval; the width is
    ``s2`` because a miss rate saturates for a meter many times noisier than
    the fleet and would under-widen it.

    Only readings before ``t`` enter the scale judging ``t``. Every scored
    reading enters its meter's window, and each stored score keeps the value,
    the expected value and the model's sigma, so a scorer meeting a meter
    rebuilds the window from the store: a restarted worker judges as an
    uninterrupted one would.
    """

    def __init__(self, window: int, cap: float, prior: int = 24) -> None:
        self.window = window
        self.cap2 = cap * cap
        self.prior = prior
        self._row: dict[Any, int] = {}  # meter -> row of the buffers
        self._values = np.zeros((0, window))  # last values per meter, right-aligned
        self._counts = np.zeros(0, np.int64)

    def prime(self, meter_ids: npt.NDArray[Any], z: Floats) -> None:
        """Past one-step ``z`` of meters (rows in time order per meter) as their window."""
        self.apply(meter_ids, z)

    def _rows_of(self, meter_ids: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Each meter's row in the window buffer (new meters get an empty one)."""
        for meter in pd.unique(meter_ids):
            if meter not in self._row:
                self._row[meter] = len(self._row)
        if len(self._row) > len(self._values):
            grown = max(2 * len(self._values), len(self._row))
            more = np.zeros((grown - len(self._values), self.window))
            self._values = np.vstack([self._values, more])
            self._counts = np.concatenate(
                [self._counts, np.zeros(grown - len(self._counts), np.int64)]
            )
        rows: npt.NDArray[np.int64] = pd.Index(list(self._row)).get_indexer(meter_ids)
        return rows  # rows are numbered in insertion order: positions in the dict

    def apply(self, meter_ids: npt.NDArray[Any], z: Floats) -> Floats:
        """The scale of each reading's ``z`` (from earlier readings), then add them to windows."""
        return self.scales(meter_ids, z)[0]

    def scales(self, meter_ids: npt.NDArray[Any], z: Floats) -> tuple[Floats, Floats]:
        """Each reading's ``z`` scale and interval widening (both from earlier readings),
        then add the readings to their meters' windows.

        Vectorised over meters: each meter's kept values, then its new ones,
        are laid end to end in one flat array, and window sums are
        differences of one cumulative sum.
        """
        if len(z) == 0:
            return np.ones(0), np.ones(0)
        rows = self._rows_of(meter_ids)
        order = np.argsort(rows, kind="stable")  # by meter, time order kept within each
        meter, new = rows[order], z[order]
        starts = np.flatnonzero(np.r_[True, meter[1:] != meter[:-1]])
        ends = np.r_[starts[1:], len(meter)]
        metas = meter[starts]  # the batch's meters, one each
        valid = np.isfinite(new)
        kept = self._counts[metas]
        added = np.add.reduceat(valid.astype(np.int64), starts)
        seg_start = np.r_[0, np.cumsum(kept + added)[:-1]]
        flat = np.empty(int((kept + added).sum()))
        # kept values: right-aligned in the buffer rows (oldest first)
        slot = np.arange(self.window)
        keep = slot[None, :] >= (self.window - kept)[:, None]
        flat_pos = seg_start[:, None] + slot[None, :] - (self.window - kept)[:, None]
        flat[flat_pos[keep]] = self._values[metas][keep]
        # new values after them, in time order
        group = np.repeat(np.arange(len(metas)), ends - starts)
        rank = np.cumsum(valid) - valid  # valid values before each row, over the batch
        rank_in = rank - rank[starts][group]
        at = seg_start[group] + kept[group] + rank_in
        flat[at[valid]] = np.minimum(new[valid] ** 2, self.cap2)
        first = np.maximum(at - self.window, seg_start[group])
        n = at - first + self.prior
        sums = np.r_[0.0, np.cumsum(flat)]
        s2 = (sums[at] - sums[first] + self.prior) / n
        # a miss of the 80 % interval: |z| > 1.28 (the cap is above it)
        misses = np.r_[0.0, np.cumsum(flat > (_SIGMAS_80 / 2) ** 2)]
        rate = (misses[at] - misses[first] + _MISS_80 * self.prior) / n
        clearly = rate - 2 * np.sqrt(rate * (1 - rate) / n) > _MISS_80
        scale = np.sqrt(np.maximum(s2, 1.0))
        out, wide = np.empty(len(z)), np.empty(len(z))
        out[order] = scale
        wide[order] = np.where(clearly, scale, 1.0)
        # the last ``window`` values of each meter become its kept values
        total = kept + added
        count = np.minimum(total, self.window)
        seg_end = seg_start + total
        take = np.clip(seg_end[:, None] - self.window + slot[None, :], 0, None)
        fill = slot[None, :] >= (self.window - count)[:, None]
        last = flat[np.minimum(take, len(flat) - 1)] if len(flat) else np.zeros(take.shape)
        self._values[metas] = np.where(fill, last, 0.0)
        self._counts[metas] = count
        return out, wide


class BufferedScorer:
    """What every stream scorer shares: its model's label, feature buffers and residual
    scales primed from the store the first time a meter appears (subclasses set
    ``loaded``, ``freq``, ``state`` and ``noise``)."""

    loaded: LoadedModel
    freq: pd.Timedelta
    state: FeatureState
    noise: ResidualScale | None
    threshold: float
    _primed: set[str]

    @property
    def label(self) -> str:
        return self.loaded.label

    @property
    def history_span(self) -> pd.Timedelta:
        """How far back a meter's stored readings fill its feature buffers."""
        return self.freq * (self.state.length + 1)

    def prime(self, stored: RecentReadings, batch: ReadingBatch) -> int:
        """Load the recent stored readings of meters this scorer has not seen; rows loaded."""
        meters = pd.unique(
            np.asarray(batch.table.column("meter_id").to_numpy(zero_copy_only=False))
        )
        new = [str(m) for m in meters if m not in self._primed]
        if not new:
            return 0
        ts = batch.table.column("ts").to_pandas()
        frame = stored.get(new, ts.min() - self.history_span, ts.max())
        if len(frame):
            self.state.update(frame)
        if self.noise is not None:
            self._prime_noise(self.noise, stored, batch, new)
        self._primed.update(new)
        return len(frame)

    def score(
        self,
        good: ReadingBatch,
        sources: npt.NDArray[Any],
        offsets: npt.NDArray[np.int64],
        now_us: int | None = None,
    ) -> tuple[pa.Table, pa.Table]:
        """Predictions (``PREDICTION_SCHEMA``) and scores (``SCORE_SCHEMA``) for ``good``.

        ``sources``/``offsets`` are the readings' bus positions (aligned with
        ``good``). The batch's readings enter the feature buffers first: a
        forecast from ``t`` may read ``t`` itself, the forecast judging ``t``
        reads up to the step before it (the model's own horizon before, for
        an online champion).
        """
        stamp = int(time.time_ns() // 1000) if now_us is None else now_us
        if len(good) == 0:
            return PREDICTION_SCHEMA.empty_table(), SCORE_SCHEMA.empty_table()
        frame = good.table.to_pandas()
        self.state.update(frame)
        ids = frame["meter_id"].astype(str).to_numpy()
        ts = pd.Series(pd.to_datetime(frame["ts"], utc=True)).reset_index(drop=True)
        forecasts, judged = self._forecasts(ids, ts)
        y = frame["value"].to_numpy(np.float64, na_value=np.nan)
        return self._rows(ids, ts, sources, offsets, stamp, forecasts, y, judged)

    def _forecasts(
        self, ids: npt.NDArray[Any], ts: pd.Series
    ) -> tuple[list[tuple[int, pd.Series, Floats]], Floats]:
        """``(horizon, target, (n, 4) forecast)`` per served horizon, and the forecast
        judging each reading."""
        raise NotImplementedError

    def _rows(
        self,
        ids: npt.NDArray[Any],
        ts: pd.Series,
        sources: npt.NDArray[Any],
        offsets: npt.NDArray[np.int64],
        stamp: int,
        forecasts: list[tuple[int, pd.Series, Floats]],
        y: Floats,
        judged: Floats,
    ) -> tuple[pa.Table, pa.Table]:
        """The predictions (one ``(horizon, target, (n, 4) forecast)`` per served horizon)
        and the scores of readings ``y`` judged against the forecasts ``judged``."""
        n = len(ids)
        score, flag, sigma, widen = anomaly_scores(y, judged, self.threshold, self.noise, ids)
        common = {
            "meter_id": pa.array(ids, pa.string()),
            "ts": pa.array(ts, TS_TYPE),
            "model": pa.array([self.label] * n, pa.string()),
            "source": pa.array(sources, pa.string()),
            "offset": pa.array(offsets, pa.int64()),
            "scored_at": pa.array(np.full(n, stamp, np.int64)),
        }
        parts = []
        for h, target, made in forecasts:
            out = _widened(made, widen)
            columns = common | {
                "horizon": pa.array(np.full(n, h, np.int32)),
                "target_ts": pa.array(target, TS_TYPE),
                "yhat": pa.array(out[:, 0]),
                "q10": pa.array(out[:, 1]),
                "q50": pa.array(out[:, 2]),
                "q90": pa.array(out[:, 3]),
            }
            parts.append(pa.table([columns[c] for c in PREDICTION_SCHEMA.names], PREDICTION_SCHEMA))
        predictions = pa.concat_tables(parts) if parts else PREDICTION_SCHEMA.empty_table()
        columns = common | {
            "value": pa.array(y, pa.float64()),
            "expected": pa.array(judged[:, 0], pa.float64()),
            "sigma": pa.array(sigma, pa.float64()),
            "score": pa.array(score, pa.float64()),
            "is_anomaly": pa.array(flag, pa.bool_()),
        }
        scores = pa.table([columns[c] for c in SCORE_SCHEMA.names], SCORE_SCHEMA)
        return predictions, scores

    def _prime_noise(
        self, noise: ResidualScale, stored: RecentReadings, batch: ReadingBatch, meters: list[str]
    ) -> None:
        """The residual windows of ``meters`` from their stored scores.

        Only readings before each meter's first one in ``batch`` count: a
        redelivered batch is judged with the window it had the first time.
        """
        first = batch.table.to_pandas().groupby("meter_id")["ts"].min()
        start = first.min() - self.freq * (noise.window + 1)
        seen = stored.scores(meters, start, first.max())
        if seen.empty:
            return
        seen = seen[seen["ts"] < seen["meter_id"].map(first)].sort_values(["meter_id", "ts"])
        sigma = seen["sigma"].to_numpy(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.abs(seen["value"].to_numpy(np.float64) - seen["expected"].to_numpy()) / sigma
        noise.prime(seen["meter_id"].astype(str).to_numpy(), np.where(sigma > 0, z, np.nan))


class ChampionScorer(BufferedScorer):
    """Forecasts and anomaly scores of one champion model for micro-batches of readings.

    This one serves gradient-boosted champions (what ``meterops train``
    promotes); an online champion is served by
    :class:`~meterops.stream_online.OnlineChampionScorer`
    (:func:`~meterops.stream_online.make_scorer` picks). Other families
    raise :class:`ConfigError` with the reason, and the worker keeps storing
    readings unscored.
    """

    def __init__(
        self, loaded: LoadedModel, scoring: ScoringSettings, compiled_dir: Path | None = None
    ) -> None:
        model = loaded.model
        if not isinstance(model, GBMForecaster):
            raise ConfigError(
                f"champion {loaded.label} is a {type(model).__name__}; the stream scores"
                " GBMForecaster champions (train one with `meterops train`)"
            )
        self.loaded = loaded
        self.model = model
        self.threshold = scoring.anomaly_threshold
        self.freq: pd.Timedelta = model.freq_
        served: dict[int, int] = {}
        for text in scoring.horizons:
            h = resolve_horizon(text, self.freq)
            g = model.model_horizon(h)
            if g is None:
                log.warning(
                    "champion %s has no model for horizon %s (%d steps; fitted %s): skipped",
                    loaded.label,
                    text,
                    h,
                    model.steps_,
                )
                continue
            served[h] = g
        self.served = served
        self.anomaly_horizon = model.model_horizon(1)
        depth = max([*served.values(), self.anomaly_horizon or 1])
        self.state = FeatureState(
            model.spec_, self.freq, depth, model.covariates_, origin=model.origin_
        )
        self.noise = (
            ResidualScale(scoring.noise_window, 3 * scoring.anomaly_threshold)
            if scoring.noise_window
            else None
        )
        self.compiled: CompiledBoosters | None = None
        if compiled_dir is not None:
            wanted = {*served.values(), *([self.anomaly_horizon] if self.anomaly_horizon else [])}
            self.compiled = CompiledBoosters({g: model.boosters_[g] for g in wanted}, compiled_dir)
        self._primed: set[str] = set()
        self._carry: tuple[pd.MultiIndex, Floats] | None = None  # last 1-step forecast per meter

    # ------------------------------------------------------------------ scoring

    def _forecast(self, ids: npt.NDArray[Any], target: pd.Series, g: int) -> Floats:
        x = self.state.feature_matrix(ids, target, g)
        fast = None if self.compiled is None else self.compiled.get(g)
        return self.model.predict_matrix(ids, x, g, self.state.names(g), fast)

    def _forecasts(
        self, ids: npt.NDArray[Any], ts: pd.Series
    ) -> tuple[list[tuple[int, pd.Series, Floats]], Floats]:
        """Per served horizon, the forecasts from each reading; and the one-step forecast
        judging each reading (reused from ``t - 1`` where it was made, see
        :meth:`_expected`)."""
        forecasts: list[tuple[int, pd.Series, Floats]] = []
        one_step: tuple[pd.Series, Floats] | None = None
        for h, g in self.served.items():
            target = ts + self.freq * h
            out = self._forecast(ids, target, g)
            if g == self.anomaly_horizon and h == 1:
                one_step = (target, out)
            forecasts.append((h, target, out))
        return forecasts, self._expected(ids, ts, one_step)

    def _expected(
        self, ids: npt.NDArray[Any], ts: pd.Series, one_step: tuple[pd.Series, Floats] | None
    ) -> Floats:
        """The one-step forecast of every reading, ``(n, 4)``.

        Most were already made: the 1-step forecast issued at ``t - 1`` (same
        model, same features, so the same numbers) in this batch or kept from
        the previous one; only the rest go through the model.
        """
        n = len(ids)
        key = pd.MultiIndex.from_arrays([ids, ts.to_numpy(dtype="datetime64[ns]")])
        out = np.full((n, 4), np.nan)
        missing = np.ones(n, dtype=bool)
        if one_step is not None:
            target, made = one_step
            known = pd.MultiIndex.from_arrays([ids, target.to_numpy(dtype="datetime64[ns]")])
            if self._carry is not None:
                known = known.append(self._carry[0])
                made = np.vstack([made, self._carry[1]])
            pos = known.get_indexer(key) if known.is_unique else _first_positions(known, key)
            found = pos >= 0
            out[found] = made[pos[found]]
            missing = ~found
            last = ~pd.Series(ids).duplicated(keep="last").to_numpy()
            self._carry = (known[: len(ids)][last], one_step[1][last])
        if missing.any() and self.anomaly_horizon is not None:
            out[missing] = self._forecast(
                ids[missing], ts[missing].reset_index(drop=True), self.anomaly_horizon
            )
        return out


def _first_positions(known: pd.MultiIndex, key: pd.MultiIndex) -> npt.NDArray[np.int64]:
    """``known.get_indexer(key)`` when ``known`` has repeats: the first occurrence wins."""
    first = ~known.duplicated(keep="first")
    positions = np.flatnonzero(first)
    pos = known[first].get_indexer(key)
    return np.where(pos >= 0, positions[np.maximum(pos, 0)], -1)


class ChampionWatcher:
    """Follows the registry's ``champion`` alias from a thread; the worker picks changes up.

    :meth:`start` does the first lookup synchronously (so a worker never
    scores its first batches with no model when a champion exists), then a
    daemon thread checks every ``reload_every`` seconds and loads a new
    version in the background. :meth:`take` returns a newly loaded model
    once (or None). Registry errors are logged and retried, never fatal.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.every = settings.scoring.reload_every
        self._lock = threading.Lock()
        self._pending: LoadedModel | None = None
        self._version: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registry: Any = None

    def _open(self) -> Any:
        if self._registry is None:
            from meterops.registry import Registry

            self._registry = Registry.from_settings(self.settings).open()
        return self._registry

    def _exists(self) -> bool:
        """False while a local registry has no database yet (no champion, nothing to import)."""
        from meterops.registry import tracking_uri_for

        uri, _ = tracking_uri_for(self.settings)
        return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()

    def check(self) -> LoadedModel | None:
        """Look the alias up now; load and queue a version different from the last one."""
        if self._registry is None and not self._exists():
            return None
        registry = self._open()
        version = registry.champion()
        if version is None or version == self._version:
            return None
        model = registry.load(version)
        loaded = LoadedModel(version, f"{registry.model_name}/{version}", model)
        with self._lock:
            self._pending = loaded
            self._version = version
        log.info("champion is now %s", loaded.label)
        return loaded

    def start(self) -> None:
        try:
            self.check()
        except (MeterOpsError, OSError) as exc:
            log.warning("cannot read the champion yet (%s); retrying in the background", exc)
        self._thread = threading.Thread(target=self._loop, name="champion-watcher", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.check()
            except Exception as exc:  # the watcher must outlive any registry error
                log.warning("champion check failed: %s", exc, exc_info=True)

    @property
    def waiting(self) -> bool:
        """A newly loaded champion waits to be taken."""
        with self._lock:
            return self._pending is not None

    def take(self) -> LoadedModel | None:
        with self._lock:
            loaded, self._pending = self._pending, None
        return loaded

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._registry is not None:
            self._registry.close()
            self._registry = None
