"""An online forecaster that learns per micro-batch, vectorised over meters.

The stream hands over micro-batches of readings (``meter_id, ts, value`` and
numeric covariates, in time order); for each one the model first forecasts
every row, then learns from it (:meth:`OnlineForecaster.predict_learn_many`,
or :meth:`~OnlineForecaster.predict_many` then
:meth:`~OnlineForecaster.learn_many`). Work per batch is a handful of NumPy
steps over all its rows, never one Python call per reading.

Features are those of :mod:`meterops.features` (the one definition), computed
by a :class:`~meterops.features.FeatureState` for horizon ``h``: the forecast
for row ``t`` reads values at ``<= t - h`` only, including earlier rows of the
same batch, so a batch of 24 hourly readings gets 24 one-hour-ahead forecasts.

No peeking at targets either: the forecast for ``t`` is made by the model as
it was when it had learned targets up to ``t - h`` at most. After each batch
the model keeps a snapshot of its coefficients tagged with the latest target
slot it has learned; a row uses the newest snapshot tagged ``<= t - h`` (for
``h = 1`` and batches in time order: the model as it was before the batch).

Per-meter level normalisation lets meters of any size share one model: each
row's level features (lags, seasonal values, rolling means) and target become
``z = (x - loc) / scale`` with ``loc`` the row's longest available rolling mean
and ``scale`` its rolling std (at least ``5 %`` of ``|loc|``); the forecast is
``loc + scale * z_hat``. A meter whose longest window is flat (std 0) is
forecast at that level.

The model is a ridge regression (shrunk towards persistence) on those
features, standardised by their running mean and variance, fitted by
exponentially weighted recursive least squares: the weighted sums ``X'WX``
and ``X'Wz`` decay by ``1 - learning_rate`` per *step* of the fleet (a batch
of ``n`` rows from ``m`` meters is ``n / m`` steps), so the model remembers
about ``1 / learning_rate`` steps whether it serves one meter or ten
thousand; the coefficients are re-solved after every batch (a ``d x d``
solve, ``d`` about 20). The running mean and variance of the features come
from the same sums. The prior towards persistence, slope and level alike,
weighs as much as 100 steps of data: a cold model starts as persistence and
hands over gradually, also when its first batch holds a whole fleet.
Robustness: features are clipped to ``clip`` running standard deviations
(a spike in a lag is read as a large but bounded deviation, not extrapolated),
targets and forecasts to 10 meter scales, and every row is weighted by the
Huber weight of its residual under the model before the batch
(``huber_delta`` residual RMS), so spikes, dropouts and level shifts cannot make it diverge.

Intervals: the model's own prequential errors, in meter-scale units, go into
an exponentially decaying histogram (same memory as the sums); its 10/50/90 %
quantiles, times the row's scale, are added to the forecast.

Fallbacks keep every stream forecast finite: until the model has seen enough
rows, or for a row without a rolling std yet (a meter's first readings), the
shared model neither serves nor learns the row and the forecast is persistence (``lag0``),
else the most recent level feature of the row, else the running mean of the
values seen, else ``0.0`` (a meter never seen before any learning).

Three ways to use it:

* the stream: ``predict_many`` / ``learn_many`` / ``predict_learn_many`` /
  ``prequential`` per micro-batch, ``observe`` to refill the feature buffers
  without learning (after a restart), ``state_dict`` / ``from_state`` to
  checkpoint (``buffers=False``: the learned part only, a few KB);
* a :class:`~meterops.models.base.Forecaster` (backtests, the registry):
  :meth:`~OnlineForecaster.fit` replays a frame in time order in micro-batches
  of ``replay_batch``; :meth:`~OnlineForecaster.predict` goes on from there
  (learning as it forecasts, as in the stream), or replays the whole frame
  from scratch when asked for slots the model has already learned or for
  another horizon than its own;
* a fleet split over partitions: :meth:`~OnlineForecaster.merge` makes one
  model of the per-partition learners (their summed statistics), which
  :meth:`~OnlineForecaster.predict_matrix` serves frozen as a stream
  champion (:mod:`meterops.online_registry`, :mod:`meterops.stream_online`).

>>> import numpy as np, pandas as pd
>>> ts = pd.date_range("2024-01-01", periods=96, freq="h", tz="UTC")
>>> frame = pd.DataFrame({"meter_id": "m", "ts": ts, "value": np.sin(np.arange(96) / 4) + 2})
>>> spec = FeatureSpec(freq="1h", seasonal_periods=(), rolling_windows=("1d",))
>>> model = OnlineForecaster(features=spec)
>>> scores = model.prequential([frame.iloc[i : i + 24] for i in range(0, 96, 24)])
>>> [s["n"] for s in scores]
[23, 24, 24, 24]
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError, InputError
from meterops.features import (
    FeaturePlan,
    FeatureSpec,
    FeatureState,
    covariate_columns,
    infer_freq,
    reading_arrays,
    regularize,
    resolve_horizon,
)
from meterops.models.base import (
    FORECAST_COLUMNS,
    QUANTILES,
    Forecaster,
    check_history,
    prepare_frame,
    sort_quantiles,
)
from meterops.settings import parse_duration
from meterops.types import ReadingBatch

__all__ = ["DEFAULT_ONLINE_FEATURES", "OnlineForecaster"]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

#: Lean features for the stream: the 7-day window keeps the buffer at one week.
DEFAULT_ONLINE_FEATURES = FeatureSpec(
    recent_lags=3,
    seasonal_periods=("1d", "7d"),
    seasonal_lags=1,
    seasonal_means=0,
    rolling_windows=("1d", "7d"),
    calendar="cyclic",
)

_NEVER = np.iinfo(np.int64).min  # the "latest target learned" of a model that learned nothing
_MIN_ROWS_PER_WEIGHT = 1  # rows seen per coefficient before the model replaces persistence
_PRIOR_STEPS = 100.0  # weight of the persistence prior, in steps of the fleet
_SD_FLOOR = 1e-2  # standardisation floor: level-normalised features are O(1)
_TARGET_CLIP = 10.0  # bound of targets and forecasts in meter-scale units (z)
_REL_SCALE_FLOOR = 0.05
_ABS_SCALE_FLOOR = 1e-6
_FLAT = 1e-9  # a window whose std is below this fraction of its mean is flat
_BINS = np.linspace(-_TARGET_CLIP, _TARGET_CLIP, 401)  # residual histogram edges (z units)
_MIN_RESIDUALS = 30.0  # histogram weight below which intervals are normal (from res_ms_)
_NORMAL_Q = np.array([-1.2815515655446004, 0.0, 1.2815515655446004])
_SNAPSHOT_SLACK = 8  # steps of late readings that still get a model at least h steps old
_MAX_SNAPSHOTS = 256
_STATE_VERSION = 2


@dataclass(frozen=True)
class _Snapshot:
    """What a forecast needs from the model, as it was after learning targets ``<= lm``."""

    lm: int
    mean: Floats
    sd: Floats
    coef: Floats
    ready: bool
    y_mean: float
    rq: Floats  # residual quantiles (z units) for QUANTILES


@dataclass
class _Rows:
    """Per-row pieces of a batch: normalised features and what the forecast is built from."""

    z: Floats
    loc: Floats
    scale: Floats
    level: Floats  # the fallback level (NaN when the row has none)
    flat: Bools
    warm: Bools  # the row has a rolling std: the shared model serves and learns it
    persistence: Floats


class OnlineForecaster(Forecaster):
    """A linear forecaster on standardised, level-normalised features that learns per batch.

    Hyper-parameters (keyword-only, stored as given): ``horizon`` in steps
    (or a duration, converted with the data frequency); ``features`` the
    :class:`FeatureSpec` (default :data:`DEFAULT_ONLINE_FEATURES`; its ``freq``
    is needed when the first batch has one reading per meter);
    ``learning_rate`` the weight of each new row against the memory (the model
    remembers about ``1 / learning_rate`` steps); ``l2`` the ridge penalty on
    standardised coefficients (per row); ``huber_delta`` the residual, in
    running residual RMS, beyond which rows are down-weighted; ``clip`` the
    bound of standardised features; ``replay_batch`` the span of the
    micro-batches :meth:`fit` and :meth:`predict` replay a frame in (aligned
    to the epoch; the model is re-solved once per batch, and a week changes
    backtest scores by less than 0.1 % against a day while replaying 7 times
    fewer batches); ``seed`` for the convention (the algorithm draws no
    random numbers).

    Learned state (set by the first batch): ``freq_``, ``horizon_``,
    ``covariates_``, ``names_`` (feature columns), ``state_`` (the feature
    buffers), the weighted sums ``xtx_``/``xtz_``, ``coef_`` (raw-coordinate
    coefficients, intercept first), ``hist_`` (residual histogram),
    ``learned_`` (latest target slot learned) and the snapshots.
    """

    name: ClassVar[str] = "online"

    def __init__(
        self,
        *,
        horizon: int | str = 1,
        features: FeatureSpec | None = None,
        learning_rate: float = 2e-5,
        l2: float = 1e-3,
        huber_delta: float = 3.0,
        clip: float = 4.0,
        replay_batch: str = "7d",
        seed: int = 0,
    ) -> None:
        self.horizon = horizon
        self.features = features
        self.learning_rate = learning_rate
        self.l2 = l2
        self.huber_delta = huber_delta
        self.clip = clip
        self.replay_batch = replay_batch
        self.seed = seed
        if not 0 < learning_rate < 1:
            raise ConfigError(f"learning_rate must be in (0, 1), got {learning_rate}")
        if l2 < 0 or huber_delta <= 0 or clip <= 0:
            raise ConfigError("l2 must be >= 0, huber_delta and clip > 0")
        try:
            span = parse_duration(replay_batch)
        except ValueError as exc:
            raise ConfigError(f"invalid replay_batch {replay_batch!r}: {exc}") from exc
        if span <= pd.Timedelta(0):
            raise ConfigError(f"replay_batch must be positive, got {replay_batch!r}")

    # ------------------------------------------------------------------ conventions

    @property
    def spec(self) -> FeatureSpec:
        return self.features if self.features is not None else DEFAULT_ONLINE_FEATURES

    @property
    def origin_(self) -> pd.Timestamp | None:
        """The grid phase: the first timestamp the feature state saw."""
        return self.state_.origin

    @property
    def ready(self) -> bool:
        """True when the linear model (not the persistence fallback) makes the forecasts."""
        return self.is_fitted and self.xtx_[0, 0] >= _MIN_ROWS_PER_WEIGHT * len(self.xtz_)

    # ------------------------------------------------------------------ set-up

    def _setup(self, frame: pd.DataFrame) -> None:
        spec = self.spec
        if spec.freq is not None:
            freq = parse_duration(spec.freq)
        else:
            try:
                freq = infer_freq(frame)
            except InputError as exc:
                raise ConfigError(
                    "cannot infer the data frequency from the first batch; "
                    "set FeatureSpec(freq=...) in features"
                ) from exc
        h = resolve_horizon(self.horizon, freq)
        plan = spec.plan(freq, h, covariate_columns(frame))
        covs = tuple(plan.past) + tuple(c for c in plan.known if c not in plan.past)
        self._start(freq, h, covs)

    def _start(self, freq: pd.Timedelta, h: int, covs: tuple[str, ...]) -> None:
        """A model that has learned nothing, for data step ``freq``, ``h`` steps, ``covs``."""
        self.freq_ = freq
        self.horizon_ = h
        self.covariates_ = covs
        self._set_plan(self.spec.plan(freq, h, covs))
        self.state_ = FeatureState(self.spec, freq, h, covs)
        p = len(self.names_) + 1
        self.xtx_ = np.zeros((p, p))
        self.xtz_ = np.zeros(p)
        self.coef_ = np.zeros(p)
        self.res_ms_ = 1.0  # running mean square of residuals (z units)
        self.y_mean_ = math.nan
        self.rows_seen_ = 0
        self.steps_ = 0.0  # decayed steps learned (a step: one row per meter)
        self.hist_ = np.zeros(len(_BINS) - 1)
        self.learned_ = int(_NEVER)
        self._snaps: list[_Snapshot] = []

    def _set_plan(self, plan: FeaturePlan) -> None:
        self.plan_ = plan
        self.names_ = list(plan.names)
        pos = {n: i for i, n in enumerate(self.names_)}
        self._level = np.array([pos[n] for n in plan.level_columns], dtype=np.int64)
        self._spread = np.array([pos[n] for n in plan.spread_columns], dtype=np.int64)
        widest = sorted(plan.windows, key=lambda w: -w[1])
        self._loc_cols = [pos[f"{n}_mean"] for n, _, _, _ in widest]
        self._scale_cols = [pos[f"{n}_std"] for n, _, _, _ in widest]
        self._lag_cols = [pos[n] for n, _ in plan.lags]

    # ------------------------------------------------------------------ per batch

    def _arrays(
        self, batch: ReadingBatch | pd.DataFrame
    ) -> tuple[npt.NDArray[np.object_], Ints, Floats]:
        frame = batch.clean().to_pandas() if isinstance(batch, ReadingBatch) else batch
        if "ts" not in frame.columns or "value" not in frame.columns:
            raise InputError("a reading batch needs columns meter_id, ts, value")
        if not self.is_fitted:
            self._setup(prepare_frame(frame))
        return reading_arrays(frame, self.covariates_)

    def _rows(self, raw: Floats) -> _Rows:
        """Level-normalised features and the per-row level, scale and fallbacks."""
        n = len(raw)
        loc = np.full(n, np.nan)
        for c in self._loc_cols:
            loc = np.where(np.isnan(loc), raw[:, c], loc)
        std = np.full(n, np.nan)
        for c in self._scale_cols:
            std = np.where(np.isnan(std), raw[:, c], std)
        level = np.full(n, np.nan)
        for c in [*self._lag_cols, *self._level.tolist(), *self._loc_cols]:
            level = np.where(np.isnan(level), raw[:, c], level)
        loc = np.where(np.isnan(loc), level, loc)
        scale = np.fmax(std, np.maximum(_REL_SCALE_FLOOR * np.abs(loc), _ABS_SCALE_FLOOR))
        z = raw.copy()
        z[:, self._level] = (raw[:, self._level] - loc[:, None]) / scale[:, None]
        z[:, self._spread] = raw[:, self._spread] / scale[:, None]
        with np.errstate(invalid="ignore"):
            flat = std <= _FLAT * np.abs(loc)
        warm = np.isfinite(std) if self._scale_cols else np.ones(n, dtype=bool)
        return _Rows(z, loc, scale, level, flat, warm, raw[:, self._lag_cols[0]])

    def _moments(self) -> tuple[Floats, Floats]:
        """Running mean and standard deviation of the features, from the weighted sums."""
        w = self.xtx_[0, 0]
        d = len(self.names_)
        if w <= 0:
            return np.zeros(d), np.ones(d)
        mean = self.xtx_[0, 1:] / w
        var = np.diag(self.xtx_)[1:] / w - mean * mean
        return mean, np.sqrt(np.maximum(var, _SD_FLOOR**2))

    def _standardise(self, z: Floats, mean: Floats, sd: Floats) -> Floats:
        """Features in running-standard units, clipped, NaN (missing) as the mean."""
        s = np.clip((z - mean) / sd, -self.clip, self.clip)
        return np.where(np.isnan(s), 0.0, s)

    def _zhat(self, s: Floats, mean: Floats, sd: Floats, coef: Floats) -> Floats:
        out: Floats = coef[0] + np.einsum("ij,j->i", mean + sd * s, coef[1:])
        return np.clip(out, -_TARGET_CLIP, _TARGET_CLIP)

    def _residual_quantiles(self) -> Floats:
        total = float(self.hist_.sum())
        if total < _MIN_RESIDUALS:
            return _NORMAL_Q * math.sqrt(self.res_ms_)
        cdf = np.r_[0.0, np.cumsum(self.hist_)] / total
        out: Floats = np.interp(np.array(QUANTILES), cdf, _BINS)
        return out

    def _snapshot(self) -> _Snapshot:
        mean, sd = self._moments()
        return _Snapshot(
            lm=int(self.learned_),
            mean=mean,
            sd=sd,
            coef=self.coef_.copy(),
            ready=bool(self.ready),
            y_mean=float(self.y_mean_),
            rq=self._residual_quantiles(),
        )

    def _untrained(self) -> _Snapshot:
        d = len(self.names_)
        zeros = np.zeros(d)
        return _Snapshot(
            int(_NEVER), zeros, np.ones(d), np.zeros(d + 1), False, math.nan, _NORMAL_Q
        )

    def _push_snapshot(self) -> None:
        snap = self._snapshot()
        if self._snaps and self._snaps[-1].lm == snap.lm:
            self._snaps[-1] = snap
        else:
            self._snaps.append(snap)
        # Keep what rows to come can use: those up to _SNAPSHOT_SLACK steps late included.
        threshold = self.learned_ + 1 - self.horizon_ - _SNAPSHOT_SLACK
        older = [i for i, s in enumerate(self._snaps) if s.lm <= threshold]
        drop = max(older[-1] if older else 0, len(self._snaps) - _MAX_SNAPSHOTS)
        del self._snaps[:drop]

    def _forecast(self, rows: _Rows, k: Ints) -> tuple[Floats, Floats]:
        """Forecasts and quantiles, each row by the newest snapshot learned up to ``t - h``."""
        n = len(k)
        yhat = np.empty(n)
        q = np.empty((n, len(QUANTILES)))
        lms = np.array([s.lm for s in self._snaps], dtype=np.int64)
        which = np.searchsorted(lms, k - self.horizon_, side="right") - 1
        groups = np.unique(which)
        for g in groups:
            snap = self._snaps[g] if g >= 0 else self._untrained()
            part: Any = slice(None) if len(groups) == 1 else which == g
            yhat[part], q[part] = self._apply(snap, rows, part)
        return yhat, q

    def _apply(self, snap: _Snapshot, rows: _Rows, part: Any) -> tuple[Floats, Floats]:
        """Forecasts and quantiles of the rows ``part`` by the model of ``snap``."""
        loc, scale, level = rows.loc[part], rows.scale[part], rows.level[part]
        if snap.ready:
            s = self._standardise(rows.z[part], snap.mean, snap.sd)
            y = loc + scale * self._zhat(s, snap.mean, snap.sd, snap.coef)
            y = np.where(rows.flat[part], loc, y)
            y = np.where(np.isfinite(y) & rows.warm[part], y, level)
        else:
            y = level
        default = snap.y_mean if math.isfinite(snap.y_mean) else 0.0
        y = np.where(np.isnan(y), default, y)
        spread = np.where(np.isfinite(scale), scale, np.maximum(_REL_SCALE_FLOOR * np.abs(y), 1e-6))
        return y, y[:, None] + spread[:, None] * snap.rq[None, :]

    def _keep(self, mask: Bools, meters: int) -> tuple[float, float]:
        """Decay factor and steps of the rows ``mask`` of a batch from ``meters`` meters."""
        steps = int(mask.sum()) / meters
        return (1 - self.learning_rate) ** steps, steps

    def _learn(self, rows: _Rows, y: Floats, yhat: Floats, k: Ints, ids: npt.NDArray[Any]) -> None:
        meters = max(1, len(pd.unique(ids)))  # a step of the fleet: one row per meter
        has_y = np.isfinite(y)
        if has_y.any():
            keep, _ = self._keep(has_y, meters)
            fresh = float(y[has_y].mean())
            old = self.y_mean_
            self.y_mean_ = fresh if math.isnan(old) else keep * old + (1 - keep) * fresh
        # the residual histogram: the prequential errors of the forecasts just made
        spread = np.where(
            np.isfinite(rows.scale),
            rows.scale,
            np.maximum(_REL_SCALE_FLOOR * np.abs(yhat), _ABS_SCALE_FLOOR),
        )
        e = (y - yhat) / spread
        scored = np.isfinite(e)
        if scored.any():
            keep, _ = self._keep(scored, meters)
            at = np.searchsorted(_BINS, e[scored], side="right") - 1
            at = np.clip(at, 0, len(_BINS) - 2)
            added = np.bincount(at, minlength=len(_BINS) - 1).astype(np.float64)
            self.hist_ = keep * self.hist_ + added
        ok = has_y & np.isfinite(rows.loc) & rows.warm
        if ok.any():
            keep, steps = self._keep(ok, meters)
            mean, sd = self._moments()
            s = self._standardise(rows.z[ok], mean, sd)
            x = np.empty((len(s), len(mean) + 1))
            x[:, 0] = 1.0
            np.multiply(sd, s, out=x[:, 1:])
            x[:, 1:] += mean
            zt = np.clip((y[ok] - rows.loc[ok]) / rows.scale[ok], -_TARGET_CLIP, _TARGET_CLIP)
            weight = np.ones(len(zt))
            if self.ready:
                resid = zt - self._zhat(s, mean, sd, self.coef_)
                bound = self.huber_delta * math.sqrt(self.res_ms_)
                big = np.abs(resid) > bound
                weight[big] = bound / np.abs(resid[big])
                self.res_ms_ = keep * self.res_ms_ + (1 - keep) * float(
                    np.mean(np.minimum(resid * resid, (_TARGET_CLIP * bound) ** 2))
                )
            xw = x * weight[:, None]
            self.xtx_ = keep * self.xtx_ + _cross(xw, x)
            self.xtz_ = keep * self.xtz_ + _cross(xw, zt[:, None])[:, 0]
            self.steps_ = keep * self.steps_ + steps
            self.rows_seen_ += len(zt)
            self._solve()
        if len(k):
            self.learned_ = max(int(self.learned_), int(k.max()))
        self._push_snapshot()

    def _solve(self) -> None:
        w = self.xtx_[0, 0]
        if w <= 0:
            return
        mean, sd = self._moments()
        cov = self.xtx_[1:, 1:] / w - np.outer(mean, mean)
        zmean = self.xtz_[0] / w
        cross = self.xtz_[1:] / w - mean * zmean
        d = len(mean)
        # Ridge towards persistence (z_hat = z_lag0), not towards zero: with little data the
        # model is persistence plus small corrections, and the penalty never pulls it below it.
        prior = np.zeros(d)
        prior[self._lag_cols[0]] = sd[self._lag_cols[0]]
        penalty = self.l2 + _PRIOR_STEPS / max(self.steps_, 1e-12)
        a = cov / np.outer(sd, sd) + penalty * np.eye(d)
        coef_s = np.linalg.solve(a, cross / sd + penalty * prior)
        coef = coef_s / sd
        # the level at the mean features is shrunk the same way, towards persistence's
        level = (zmean + penalty * mean[self._lag_cols[0]]) / (1 + penalty)
        self.coef_ = np.r_[level - mean @ coef, coef]

    def _step(
        self, ids: npt.NDArray[Any], ts_ns: Ints, data: Floats, learn: bool
    ) -> tuple[Floats, Floats, Floats, _Rows]:
        """Store the readings, forecast every row, learn them: ``yhat, q, y, rows``."""
        st = self.state_
        st.update_arrays(ids, ts_ns, data)
        rows = self._rows(st.feature_matrix(ids, ts_ns, self.horizon_))
        k = st.slots(ts_ns)
        yhat, q = self._forecast(rows, k)
        y = data[:, 0]
        if learn:
            self._learn(rows, y, yhat, k, ids)
        return yhat, q, y, rows

    # ------------------------------------------------------------------ stream API

    def predict_many(self, batch: ReadingBatch | pd.DataFrame) -> Floats:
        """Forecasts for every row of ``batch`` (``horizon`` steps ahead), always finite.

        Row ``t`` is forecast from values at ``<= t - horizon`` (earlier rows
        of the batch included; its own ``value`` never). The batch's readings
        are stored in the feature state, which is idempotent: storing the
        same readings again in :meth:`learn_many` changes nothing. The model
        itself does not change.
        """
        yhat, _, _, _ = self._step(*self._arrays(batch), learn=False)
        return yhat

    def learn_many(self, batch: ReadingBatch | pd.DataFrame) -> Self:
        """Store the batch's readings and update the model with its rows; returns ``self``.

        Rows with a missing value, or without any history for their meter,
        teach nothing (their readings still feed later features).
        """
        self._step(*self._arrays(batch), learn=True)
        return self

    def predict_learn_many(self, batch: ReadingBatch | pd.DataFrame) -> Floats:
        """:meth:`predict_many` then :meth:`learn_many` with one feature computation."""
        yhat, _, _, _ = self._step(*self._arrays(batch), learn=True)
        return yhat

    def observe(self, batch: ReadingBatch | pd.DataFrame) -> Self:
        """Store readings in the feature buffers without learning or forecasting.

        How a restarted worker rebuilds the buffers of a model restored from a
        ``state_dict(buffers=False)`` checkpoint: observe the meters' last
        :attr:`~meterops.features.FeatureState.length` steps from the store,
        then go on; the forecasts are those of the model that never stopped.
        """
        ids, ts_ns, data = self._arrays(batch)
        self.state_.update_arrays(ids, ts_ns, data, grow=False)
        return self

    def prequential(
        self, batches: Iterable[ReadingBatch | pd.DataFrame], warmup: int = 0
    ) -> list[dict[str, float | int | None]]:
        """Predict each batch, score it, then learn it: one metrics dict per batch.

        Scored points have a known value and a persistence forecast
        (``y[t - h]``), so the model and ``persistence_*`` compare on the same
        points: ``n``, ``rmse``, ``mae``, ``persistence_rmse``,
        ``persistence_mae`` for the batch and ``cum_*`` over every batch from
        index ``warmup`` on (``None`` before it or with no point yet).
        """
        out: list[dict[str, float | int | None]] = []
        acc = np.zeros(5)  # n, model se, model ae, persistence se, persistence ae
        for i, batch in enumerate(batches):
            yhat, _, y, rows = self._step(*self._arrays(batch), learn=True)
            pers = rows.persistence
            ok = np.isfinite(y) & np.isfinite(pers)
            e, p = y[ok] - yhat[ok], y[ok] - pers[ok]
            sums = np.array(
                [ok.sum(), (e * e).sum(), np.abs(e).sum(), (p * p).sum(), np.abs(p).sum()]
            )
            if i >= warmup:
                acc += sums
            row: dict[str, float | int | None] = {"batch": i, "n": int(sums[0])}
            for prefix, part in (("", sums), ("cum_", acc if i >= warmup else np.zeros(5))):
                m = part[0]
                row[f"{prefix}rmse"] = math.sqrt(part[1] / m) if m else None
                row[f"{prefix}mae"] = part[2] / m if m else None
                row[f"{prefix}persistence_rmse"] = math.sqrt(part[3] / m) if m else None
                row[f"{prefix}persistence_mae"] = part[4] / m if m else None
            out.append(row)
        return out

    def predict_matrix(self, x: Floats) -> Floats:
        """Forecasts from raw feature rows by the model as it is now: ``(n, 4)`` yhat, q10-q90.

        ``x`` holds the columns :attr:`names_` for the model's horizon, as
        :meth:`FeatureState.feature_matrix <meterops.features.FeatureState.feature_matrix>`
        gives them (so each row already reads only values at ``<= t - horizon``).
        Every row is served by the latest learned state, whatever its time:
        how a frozen model (a registry champion) serves a stream it no longer
        learns from; nothing is stored or learned.
        """
        self._check_fitted()
        raw = np.asarray(x, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(self.names_):
            raise InputError(
                f"expected a feature matrix with {len(self.names_)} columns, got {raw.shape}"
            )
        yhat, q = self._apply(self._snapshot(), self._rows(raw), slice(None))
        return np.column_stack([yhat, q])

    # ------------------------------------------------------------------ merging

    @classmethod
    def merge(cls, models: Sequence[OnlineForecaster]) -> OnlineForecaster:
        """One model from learners that saw disjoint sets of meters over the same time.

        How a fleet split over bus partitions (one learner each) becomes one
        registry model. The learned state is a set of sufficient statistics,
        so the merged model is what one learner fed every meter would have
        learned, up to the small differences noted below:

        * summed: the weighted sums ``X'WX`` and ``X'Wz`` (the features are
          level-normalised, so meters of any size add up), the residual
          histogram and ``rows_seen_``;
        * ``steps_`` (decayed steps of the fleet) is *time*, not data: the
          partitions learned the same time steps side by side, and one
          learner fed all meters would have counted each step once. So it is
          the row-weighted mean of the learners' ``steps_``, not their sum.
          The persistence prior weighs ``_PRIOR_STEPS`` steps of whatever
          fleet the sums hold: with the mean it is counted once for the
          merged fleet (as each learner counted it for its own meters); the
          sum would make the model look ``k`` times older and shrink the
          prior ``k``-fold;
        * ``res_ms_`` and ``y_mean_`` are running means: row-weighted means;
        * ``learned_`` is the latest target slot any learner learned (on the
          grid of the earliest origin): the merged state contains data up to
          there, so no row before it may use it (no peeking);
        * coefficients are re-solved from the summed statistics (averaging
          the learners' coefficients would weight a partition of two meters
          like one of two thousand and ignore how their features co-vary);
          the past snapshots cannot be merged (they are solutions, not sums):
          the merged model starts with the one snapshot of its own state;
        * not reproduced: each learner down-weighted outliers (Huber) and
          clipped features with its own running model, and its residual
          histogram and ``res_ms_`` hold the errors of its own forecasts,
          where one learner would have used the shared model (forecasts
          agree to a fraction of a percent, intervals to about one); the
          feature buffers start empty (:meth:`observe` the recent readings
          before forecasting).

        Raises :class:`InputError` when ``models`` is empty, holds an
        unfitted model, or models that differ in hyper-parameters, data
        frequency, horizon, covariates or grid phase (their sums would not
        describe the same features).
        """
        if not models:
            raise InputError("nothing to merge: no online models given")
        first = models[0]
        for m in models:
            if not m.is_fitted:
                raise InputError("cannot merge an online model that has learned nothing")
            problem = _merge_mismatch(first, m)
            if problem:
                raise InputError(f"cannot merge online models with different {problem}")
        origins = [int(m.origin_.value) if m.origin_ is not None else None for m in models]
        known = [o for o in origins if o is not None]
        origin = min(known) if known else None
        merged = cls(**first.get_params())
        merged._start(first.freq_, first.horizon_, first.covariates_)
        length = max(int(m.state_.length) for m in models)
        merged.state_.load_state_dict({"origin_ns": origin, "length": length})
        weights = np.array([max(float(m.xtx_[0, 0]), 0.0) for m in models])
        total = float(weights.sum())
        share = weights / total if total > 0 else np.full(len(models), 1.0 / len(models))
        merged.xtx_ = np.sum([m.xtx_ for m in models], axis=0)
        merged.xtz_ = np.sum([m.xtz_ for m in models], axis=0)
        merged.hist_ = np.sum([m.hist_ for m in models], axis=0)
        merged.rows_seen_ = sum(int(m.rows_seen_) for m in models)
        merged.steps_ = float(share @ np.array([m.steps_ for m in models]))
        merged.res_ms_ = float(share @ np.array([m.res_ms_ for m in models]))
        means = np.array([m.y_mean_ for m in models])
        has = np.isfinite(means)
        if has.any():
            w = share[has] if share[has].sum() > 0 else np.ones(int(has.sum()))
            merged.y_mean_ = float(w @ means[has] / w.sum())
        learned = [
            int(m.learned_) + (o - origin) // int(m.freq_.value)
            for m, o in zip(models, origins, strict=True)
            if int(m.learned_) != int(_NEVER) and o is not None and origin is not None
        ]
        merged.learned_ = max(learned) if learned else int(_NEVER)
        merged._solve()
        merged._push_snapshot()
        return merged

    # ------------------------------------------------------------------ Forecaster API

    def fit(self, frame: pd.DataFrame) -> Self:
        """Forget everything, then learn ``frame`` as a stream (time order, ``replay_batch``).

        Raises :class:`InputError` when the frame has no readings or every
        meter is shorter than the horizon.
        """
        df = prepare_frame(frame)
        if df.empty:
            raise InputError("no readings to learn from")
        self._setup(df)
        grid = regularize(df, self.freq_, df["ts"].min(), self.covariates_)
        check_history(grid, self.horizon_)
        self.state_.origin = df["ts"].min()
        self._replay(grid)
        return self

    def horizon_for_step(self, step: int) -> int:
        """Steps up to the model's horizon are served by it (from older data); later ones not."""
        self._check_fitted()
        return self.horizon_ if step <= self.horizon_ else step

    def _replay(self, grid: pd.DataFrame) -> tuple[Floats, Floats, Floats]:
        """Predict-then-learn ``grid`` in epoch-aligned ``replay_batch`` spans: yhat, q, level."""
        ids, ts_ns, data = reading_arrays(grid, self.covariates_)
        n = len(ids)
        yhat, q, level = np.full(n, np.nan), np.full((n, len(QUANTILES)), np.nan), np.full(n, 0.0)
        if not n:
            return yhat, q, level
        block = ts_ns // parse_duration(self.replay_batch).value
        order = np.argsort(block, kind="stable")
        for part in np.split(order, np.flatnonzero(np.diff(block[order])) + 1):
            yhat[part], q[part], _, rows = self._step(ids[part], ts_ns[part], data[part], True)
            level[part] = rows.level
        return yhat, q, level

    def predict(
        self,
        frame: pd.DataFrame,
        horizon: int | str,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """As-of forecasts for every grid slot ``start <= t < end`` of ``frame``.

        Each from readings at ``<= t - horizon`` by the model as it was when it
        had learned targets up to ``t - horizon`` at most. Slots after those
        the model has learned are forecast by a copy of it that goes on
        learning ``frame`` as it forecasts (the fitted model is unchanged);
        when earlier slots are asked for, or a horizon other than the
        model's own, a fresh twin replays ``frame`` from its start (cost: the
        whole frame). A slot with no reading in reach gets NaN.
        """
        self._check_fitted()
        h = resolve_horizon(horizon, self.freq_)
        df = prepare_frame(frame)
        grid = regularize(df, self.freq_, self.origin_, self.covariates_)
        if end is not None:
            grid = grid[(grid["ts"] < _utc_ts(end)).to_numpy()]
        wanted = np.ones(len(grid), dtype=bool)
        if start is not None:
            wanted &= (grid["ts"] >= _utc_ts(start)).to_numpy()
        grid = grid.reset_index(drop=True)
        if not wanted.any():
            return pd.DataFrame({c: [] for c in FORECAST_COLUMNS})
        slots = self.state_.slots(grid["ts"])
        if h == self.horizon_ and int(slots[wanted].min()) > self.learned_:
            model = copy.deepcopy(self)
            done = slots <= self.learned_
            recent = done & (slots > self.learned_ - model.state_.length)
            ids, ts_ns, data = reading_arrays(grid[recent], self.covariates_)
            model.state_.update_arrays(ids, ts_ns, data, grow=False)
            run = ~done
        else:
            model = self.clone()
            model.horizon = h
            model._start(self.freq_, h, self.covariates_)
            model.state_.origin = self.origin_
            run = np.ones(len(grid), dtype=bool)
        yhat, q, level = np.full(len(grid), np.nan), np.full((len(grid), 3), np.nan), np.zeros(0)
        yhat[run], q[run], level = model._replay(grid[run])
        lost = np.zeros(len(grid), dtype=bool)
        lost[run] = np.isnan(level)  # no reading in reach: no forecast
        yhat[lost], q[lost] = np.nan, np.nan
        out = grid.loc[wanted, ["meter_id", "ts"]].reset_index(drop=True)
        out["yhat"] = yhat[wanted]
        for j, col in enumerate(("q10", "q50", "q90")):
            out[col] = q[wanted, j]
        return sort_quantiles(out)[list(FORECAST_COLUMNS)]

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self, buffers: bool = True) -> dict[str, Any]:
        """Everything needed to resume: JSON-able numbers, strings and NumPy arrays.

        With ``buffers=False`` only the learned part (sums, coefficients,
        residual histogram, snapshots, meta: a few KB whatever the number of
        meters): restore it with :meth:`from_state`, then :meth:`observe` the
        recent readings to refill the feature buffers.
        """
        params = self.get_params()
        spec = params["features"]
        params["features"] = None if spec is None else dataclasses.asdict(spec)
        out: dict[str, Any] = {"version": _STATE_VERSION, "params": params}
        if not self.is_fitted:
            return out
        snaps = self._snaps
        d = len(self.names_)
        out.update(
            freq_ns=int(self.freq_.value),
            horizon=int(self.horizon_),
            covariates=list(self.covariates_),
            xtx=self.xtx_.copy(),
            xtz=self.xtz_.copy(),
            coef=self.coef_.copy(),
            hist=self.hist_.copy(),
            res_ms=float(self.res_ms_),
            y_mean=float(self.y_mean_),
            rows_seen=int(self.rows_seen_),
            steps=float(self.steps_),
            learned=int(self.learned_),
            snap_lm=np.array([s.lm for s in snaps], dtype=np.int64),
            snap_mean=np.array([s.mean for s in snaps]).reshape(len(snaps), d),
            snap_sd=np.array([s.sd for s in snaps]).reshape(len(snaps), d),
            snap_coef=np.array([s.coef for s in snaps]).reshape(len(snaps), d + 1),
            snap_ready=np.array([s.ready for s in snaps], dtype=np.bool_),
            snap_y_mean=np.array([s.y_mean for s in snaps]),
            snap_rq=np.array([s.rq for s in snaps]).reshape(len(snaps), len(QUANTILES)),
        )
        buffered = self.state_.state_dict()
        if not buffers:
            buffered = {k: buffered[k] for k in ("origin_ns", "length")}
        out.update(buffered)
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OnlineForecaster:
        """A model identical to the one whose :meth:`state_dict` gave ``state``.

        From a ``buffers=False`` state the feature buffers start empty.
        Raises :class:`InputError` for a state of another format version.
        """
        if state.get("version") != _STATE_VERSION:
            raise InputError(
                f"unsupported online model state version {state.get('version')!r}"
                f" (this meterops reads version {_STATE_VERSION}); retrain the model"
            )
        params = dict(state["params"])
        spec = params.get("features")
        if spec is not None:
            fields: dict[str, Any] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in dict(spec).items()
            }
            params["features"] = FeatureSpec(**fields)
        model = cls(**params)
        if "freq_ns" not in state:
            return model
        covs = tuple(str(c) for c in state["covariates"])
        model._start(pd.Timedelta(int(state["freq_ns"]), unit="ns"), int(state["horizon"]), covs)
        model.state_.load_state_dict(state)
        p = len(model.names_) + 1
        model.xtx_ = np.array(state["xtx"], dtype=np.float64).reshape(p, p)
        model.xtz_ = np.array(state["xtz"], dtype=np.float64).reshape(p)
        model.coef_ = np.array(state["coef"], dtype=np.float64).reshape(p)
        model.hist_ = np.array(state["hist"], dtype=np.float64).reshape(len(_BINS) - 1)
        model.res_ms_ = float(state["res_ms"])
        model.y_mean_ = float(state["y_mean"])
        model.rows_seen_ = int(state["rows_seen"])
        model.steps_ = float(state["steps"])
        model.learned_ = int(state["learned"])
        lm = np.asarray(state["snap_lm"], dtype=np.int64).reshape(-1)
        s = len(lm)
        parts = {
            key: np.asarray(state[f"snap_{key}"], dtype=np.float64).reshape(s, -1)
            for key in ("mean", "sd", "coef", "rq")
        }
        ready = np.asarray(state["snap_ready"], dtype=np.bool_).reshape(s)
        y_mean = np.asarray(state["snap_y_mean"], dtype=np.float64).reshape(s)
        model._snaps = [
            _Snapshot(
                int(lm[i]),
                parts["mean"][i],
                parts["sd"][i],
                parts["coef"][i],
                bool(ready[i]),
                float(y_mean[i]),
                parts["rq"][i],
            )
            for i in range(s)
        ]
        return model


def _merge_mismatch(a: OnlineForecaster, b: OnlineForecaster) -> str:
    """What keeps the learned sums of ``a`` and ``b`` from describing the same features."""
    if a.get_params() != b.get_params():
        diff = sorted(k for k, v in a.get_params().items() if b.get_params().get(k) != v)
        return f"hyper-parameters ({', '.join(diff)})"
    if a.freq_ != b.freq_:
        return f"data frequency ({a.freq_} vs {b.freq_})"
    if a.horizon_ != b.horizon_:
        return f"horizon ({a.horizon_} vs {b.horizon_} steps)"
    if a.covariates_ != b.covariates_ or a.names_ != b.names_:
        return f"covariates ({list(a.covariates_)} vs {list(b.covariates_)})"
    apart = 0 if a.origin_ is None or b.origin_ is None else a.origin_.value - b.origin_.value
    if apart % a.freq_.value:
        return f"grid phase (origins {a.origin_} and {b.origin_})"
    return ""


def _cross(a: Floats, b: Floats) -> Floats:
    """``a.T @ b`` for tall, narrow matrices, in row blocks.

    One BLAS call on thousands of rows goes multi-threaded, which on a busy
    machine costs 10-100 times the arithmetic; blocks of 1024 rows stay on
    one thread (and give the same numbers whatever the machine's threads).
    """
    out = np.zeros((a.shape[1], b.shape[1]))
    for i in range(0, len(a), 1024):
        out += np.dot(a[i : i + 1024].T, b[i : i + 1024])
    return out


def _utc_ts(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
