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
same batch, so a batch of 24 hourly readings gets 24 one-hour-ahead forecasts
made with the model as it was before the batch.

Per-meter level normalisation lets meters of any size share one model: each
row's level features (lags, seasonal values, rolling means) and target become
``z = (x - loc) / scale`` with ``loc`` the row's longest available rolling mean
and ``scale`` its rolling std (at least ``5 %`` of ``|loc|``); the forecast is
``loc + scale * z_hat``.

The model is a ridge regression (shrunk towards persistence) on those
features, standardised by their running mean and variance, fitted by
exponentially weighted recursive least squares: the weighted sums ``X'WX``
and ``X'Wz`` decay by ``1 - learning_rate`` per row (the model remembers
about ``1 / learning_rate`` rows) and the coefficients are re-solved after
every batch (a ``d x d`` solve, ``d`` about 20). The running mean and
variance of the features come from the same sums.
Robustness: features are clipped to ``clip`` running standard deviations
(a spike in a lag is read as a large but bounded deviation, not extrapolated),
targets and forecasts to 10 meter scales, and every row is weighted by the
Huber weight of its residual under the model before the batch
(``huber_delta`` residual RMS), so spikes, dropouts and level shifts cannot make it diverge.

Fallbacks keep every forecast finite: until the model has seen enough rows,
or for a row without a level, the forecast is persistence (``lag0``), else the
most recent level feature of the row, else the running mean of the values
seen, else ``0.0`` (a meter never seen before any learning).

:meth:`~OnlineForecaster.state_dict` holds JSON-able numbers and NumPy arrays
only (no pickle), and :meth:`~OnlineForecaster.from_state` restores an
identical model.

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

import dataclasses
import inspect
import math
from collections.abc import Iterable
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError, InputError
from meterops.features import (
    FeaturePlan,
    FeatureSpec,
    FeatureState,
    _ns,
    _utc,
    covariate_columns,
    infer_freq,
    resolve_horizon,
)
from meterops.settings import parse_duration
from meterops.types import ReadingBatch

__all__ = ["DEFAULT_ONLINE_FEATURES", "OnlineForecaster"]

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

#: Lean features for the stream: the 7-day window keeps the buffer at one week.
DEFAULT_ONLINE_FEATURES = FeatureSpec(
    recent_lags=3,
    seasonal_periods=("1d", "7d"),
    seasonal_lags=1,
    seasonal_means=0,
    rolling_windows=("1d", "7d"),
    calendar="cyclic",
)

_EMPTY = np.iinfo(np.int64).min
_MAX_GROWTH = 4  # a buffer grows to at most this many times its base length
_MIN_ROWS_PER_WEIGHT = 1  # rows seen per coefficient before the model replaces persistence
_PRIOR_ROWS = 100.0  # weight of the persistence prior, in rows
_SD_FLOOR = 1e-2  # standardisation floor: level-normalised features are O(1)
_TARGET_CLIP = 10.0  # bound of targets and forecasts in meter-scale units (z)
_REL_SCALE_FLOOR = 0.05
_ABS_SCALE_FLOOR = 1e-6
_STATE_VERSION = 1


class _StreamState(FeatureState):
    """A :class:`FeatureState` whose :meth:`update` is vectorised across meters.

    Same buffers and the same semantics as the parent (readings sharing a slot
    in one batch are averaged, a later reading for a slot replaces it, readings
    older than the buffer are dropped), so :meth:`FeatureState.features` reads
    them unchanged; the parent's update loops over the meters of a batch,
    which costs ~40 us per meter. The buffer also grows (up to
    ``_MAX_GROWTH`` times) so that a batch spanning several steps keeps full
    features for its earliest rows.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        freq: pd.Timedelta,
        max_horizon: int,
        covariates: tuple[str, ...],
    ) -> None:
        super().__init__(spec, freq, max_horizon, covariates)
        self.base_length = self.length

    def _grow(self, length: int) -> None:
        add = length - self.length
        rows = len(self._values)
        self._values = np.concatenate([np.full((rows, add), np.nan), self._values], axis=1)
        pad = np.full((rows, add, len(self.covariates)), np.nan)
        self._covs = np.concatenate([pad, self._covs], axis=1)
        self.length = length

    def rows_of(self, ids: npt.NDArray[Any], add: bool) -> Ints:
        """Buffer row of each meter id (``-1`` unknown, or a new row when ``add``)."""
        codes, uniques = pd.factorize(ids)
        rows = np.fromiter(
            (self._index.get(m, -1) for m in uniques), dtype=np.int64, count=len(uniques)
        )
        new = np.flatnonzero(rows < 0)
        if add and len(new):
            first = len(self._index)
            for i, pos in enumerate(new):
                self._index[str(uniques[pos])] = first + i
            rows[new] = first + np.arange(len(new))
            n = len(new)
            self._values = np.vstack([self._values, np.full((n, self.length), np.nan)])
            pad = np.full((n, self.length, len(self.covariates)), np.nan)
            self._covs = np.concatenate([self._covs, pad])
            self._end = np.r_[self._end, np.full(n, _EMPTY, dtype=np.int64)]
        out: Ints = rows[codes]
        return out

    def slots(self, ts_ns: Ints) -> Ints:
        assert self.origin is not None  # noqa: S101 - set by the caller
        out: Ints = np.rint((ts_ns - self.origin.value) / self.freq.value).astype(np.int64)
        return out

    def update_arrays(self, ids: npt.NDArray[Any], ts_ns: Ints, data: Floats) -> None:
        """Store readings: ``data`` is ``value`` then the covariates, one row per reading."""
        if len(ids) == 0:
            return
        if self.origin is None:
            self.origin = pd.Timestamp(int(ts_ns.min()), tz="UTC")
        rows = self.rows_of(ids, add=True)
        k = self.slots(ts_ns)
        order = np.lexsort((k, rows))
        rs, ks, d = rows[order], k[order], data[order]
        cut = np.r_[True, (rs[1:] != rs[:-1]) | (ks[1:] != ks[:-1])]
        if not cut.all():  # several readings share a slot: their mean, NaN skipped
            starts = np.flatnonzero(cut)
            valid = ~np.isnan(d)
            total = np.add.reduceat(np.where(valid, d, 0.0), starts, axis=0)
            count = np.add.reduceat(valid.astype(np.float64), starts, axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                d = np.where(count > 0, total / count, np.nan)
            rs, ks = rs[starts], ks[starts]
        first = np.flatnonzero(np.r_[True, rs[1:] != rs[:-1]])
        meters = rs[first]
        top = np.maximum.reduceat(ks, first)
        low = np.minimum.reduceat(ks, first)
        need = min(self.base_length + int((top - low).max()), self.base_length * _MAX_GROWTH)
        if need > self.length:
            self._grow(need)
        length = self.length
        end = self._end[meters]
        end = np.where(end == _EMPTY, top, end)
        move = top - end
        shift = move > 0
        if shift.any():
            moving, by = meters[shift], move[shift]
            idx = np.arange(length)[None, :] + by[:, None]
            ok = idx < length
            idx = np.minimum(idx, length - 1)
            self._values[moving] = np.where(ok, self._values[moving[:, None], idx], np.nan)
            if self.covariates:
                old = self._covs[moving[:, None], idx]
                self._covs[moving] = np.where(ok[:, :, None], old, np.nan)
        end = np.maximum(end, top)
        self._end[meters] = end
        counts = np.diff(np.r_[first, len(rs)])
        j = length - 1 - (np.repeat(end, counts) - ks)
        keep = j >= 0
        self._values[rs[keep], j[keep]] = d[keep, 0]
        if self.covariates:
            self._covs[rs[keep], j[keep]] = d[keep, 1:]


class OnlineForecaster:
    """A linear forecaster on standardised, level-normalised features that learns per batch.

    Hyper-parameters (keyword-only, stored as given): ``horizon`` in steps
    (or a duration, converted with the data frequency); ``features`` the
    :class:`FeatureSpec` (default :data:`DEFAULT_ONLINE_FEATURES`; its ``freq``
    is needed when the first batch has one reading per meter);
    ``learning_rate`` the weight of each new row against the memory (the model
    remembers about ``1 / learning_rate`` rows); ``l2`` the ridge penalty on
    standardised coefficients (per row); ``huber_delta`` the residual, in
    running residual RMS, beyond which rows are down-weighted; ``clip`` the
    bound of standardised features; ``seed`` for the
    convention (the algorithm draws no random numbers).

    Learned state (set by the first batch): ``freq_``, ``covariates_``,
    ``names_`` (feature columns), ``state_`` (the feature buffers), the
    weighted sums ``xtx_``/``xtz_`` and ``coef_`` (raw-coordinate
    coefficients, intercept first).
    """

    def __init__(
        self,
        *,
        horizon: int | str = 1,
        features: FeatureSpec | None = None,
        learning_rate: float = 2e-5,
        l2: float = 1e-3,
        huber_delta: float = 3.0,
        clip: float = 4.0,
        seed: int = 0,
    ) -> None:
        self.horizon = horizon
        self.features = features
        self.learning_rate = learning_rate
        self.l2 = l2
        self.huber_delta = huber_delta
        self.clip = clip
        self.seed = seed
        if not 0 < learning_rate < 1:
            raise ConfigError(f"learning_rate must be in (0, 1), got {learning_rate}")
        if l2 < 0 or huber_delta <= 0 or clip <= 0:
            raise ConfigError("l2 must be >= 0, huber_delta and clip > 0")

    # ------------------------------------------------------------------ conventions

    def get_params(self) -> dict[str, Any]:
        """The constructor keywords, as given."""
        sig = inspect.signature(type(self).__init__)
        return {p.name: getattr(self, p.name) for p in sig.parameters.values() if p.name != "self"}

    def clone(self) -> Self:
        """An untrained twin with the same hyper-parameters."""
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def is_fitted(self) -> bool:
        """True once a batch has set up the feature state (predictions may still be fallbacks)."""
        return hasattr(self, "state_")

    @property
    def spec(self) -> FeatureSpec:
        return self.features if self.features is not None else DEFAULT_ONLINE_FEATURES

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
        self.freq_ = freq
        self.horizon_ = h
        self.covariates_ = covs
        self._set_plan(spec.plan(freq, h, covs))
        self.state_ = _StreamState(spec, freq, h, covs)
        p = len(self.names_) + 1
        self.xtx_ = np.zeros((p, p))
        self.xtz_ = np.zeros(p)
        self.coef_ = np.zeros(p)
        self.res_ms_ = 1.0  # running mean square of residuals (z units)
        self.y_mean_ = math.nan
        self.rows_seen_ = 0

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
    ) -> tuple[npt.NDArray[Any], pd.Series, Ints, Floats]:
        frame = batch.clean().to_pandas() if isinstance(batch, ReadingBatch) else batch
        if "ts" not in frame.columns or "value" not in frame.columns:
            raise InputError("a reading batch needs columns meter_id, ts, value")
        if not self.is_fitted:
            self._setup(frame)
        n = len(frame)
        if "meter_id" in frame.columns:
            ids = frame["meter_id"].astype(str).to_numpy(dtype=object)
        else:
            ids = np.full(n, "series", dtype=object)
        ts = _utc(frame["ts"]).reset_index(drop=True)
        cols = ["value", *self.covariates_]
        data = np.column_stack(
            [
                pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
                if c in frame.columns
                else np.full(n, np.nan)
                for c in cols
            ]
        ).reshape(n, len(cols))
        data[~np.isfinite(data)] = np.nan
        return ids, ts, _ns(ts), data

    def _design(
        self, ids: npt.NDArray[Any], ts: pd.Series
    ) -> tuple[Floats, Floats, Floats, Floats, Floats]:
        """Level-normalised features ``z``, ``loc``, ``scale``, fallback and persistence."""
        feats = self.state_.features(ids, ts, self.horizon_)
        raw = feats[self.names_].to_numpy(np.float64)
        n = len(raw)
        loc = np.full(n, np.nan)
        for c in self._loc_cols:
            loc = np.where(np.isnan(loc), raw[:, c], loc)
        std = np.full(n, np.nan)
        for c in self._scale_cols:
            std = np.where(np.isnan(std), raw[:, c], std)
        fallback = np.full(n, np.nan)
        for c in [*self._lag_cols, *self._level.tolist(), *self._loc_cols]:
            fallback = np.where(np.isnan(fallback), raw[:, c], fallback)
        loc = np.where(np.isnan(loc), fallback, loc)
        scale = np.fmax(std, np.maximum(_REL_SCALE_FLOOR * np.abs(loc), _ABS_SCALE_FLOOR))
        z = raw.copy()
        z[:, self._level] = (raw[:, self._level] - loc[:, None]) / scale[:, None]
        z[:, self._spread] = raw[:, self._spread] / scale[:, None]
        default = self.y_mean_ if math.isfinite(self.y_mean_) else 0.0
        fallback = np.where(np.isnan(fallback), default, fallback)
        return z, loc, scale, fallback, raw[:, self._lag_cols[0]]

    def _moments(self) -> tuple[Floats, Floats]:
        """Running mean and standard deviation of the features, from the weighted sums."""
        w = self.xtx_[0, 0]
        d = len(self.names_)
        if w <= 0:
            return np.zeros(d), np.ones(d)
        mean = self.xtx_[0, 1:] / w
        var = np.diag(self.xtx_)[1:] / w - mean * mean
        return mean, np.sqrt(np.maximum(var, _SD_FLOOR**2))

    def _standardise(self, z: Floats) -> Floats:
        """Features in running-standard units, clipped, NaN (missing) as the mean."""
        mean, sd = self._moments()
        s = np.clip((z - mean) / sd, -self.clip, self.clip)
        return np.where(np.isnan(s), 0.0, s)

    @property
    def ready(self) -> bool:
        """True when the linear model (not the persistence fallback) makes the forecasts."""
        return self.is_fitted and self.xtx_[0, 0] >= _MIN_ROWS_PER_WEIGHT * len(self.xtz_)

    def _zhat(self, s: Floats) -> Floats:
        mean, sd = self._moments()
        raw = mean + sd * s
        out: Floats = self.coef_[0] + raw @ self.coef_[1:]
        return np.clip(out, -_TARGET_CLIP, _TARGET_CLIP)

    def _forecast(self, s: Floats, loc: Floats, scale: Floats, fallback: Floats) -> Floats:
        if not self.ready:
            return fallback
        yhat = loc + scale * self._zhat(s)
        return np.where(np.isfinite(yhat), yhat, fallback)

    def _learn(self, s: Floats, loc: Floats, scale: Floats, y: Floats) -> None:
        rows = np.isfinite(y) & np.isfinite(loc)
        finite_y = y[np.isfinite(y)]
        if len(finite_y):
            keep = (1 - self.learning_rate) ** len(finite_y)
            fresh = float(finite_y.mean())
            old = self.y_mean_
            self.y_mean_ = fresh if math.isnan(old) else keep * old + (1 - keep) * fresh
        if not rows.any():
            return
        mean, sd = self._moments()
        x = np.column_stack([np.ones(int(rows.sum())), mean + sd * s[rows]])
        zt = np.clip((y[rows] - loc[rows]) / scale[rows], -_TARGET_CLIP, _TARGET_CLIP)
        weight = np.ones(len(zt))
        if self.ready:
            resid = zt - self._zhat(s[rows])
            bound = self.huber_delta * math.sqrt(self.res_ms_)
            big = np.abs(resid) > bound
            weight[big] = bound / np.abs(resid[big])
            keep = (1 - self.learning_rate) ** len(zt)
            self.res_ms_ = keep * self.res_ms_ + (1 - keep) * float(
                np.mean(np.minimum(resid * resid, (_TARGET_CLIP * bound) ** 2))
            )
        keep = (1 - self.learning_rate) ** len(zt)
        xw = x * weight[:, None]
        self.xtx_ = keep * self.xtx_ + xw.T @ x
        self.xtz_ = keep * self.xtz_ + xw.T @ zt
        self.rows_seen_ += len(zt)
        self._solve()

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
        penalty = self.l2 + _PRIOR_ROWS / w
        a = cov / np.outer(sd, sd) + penalty * np.eye(d)
        coef_s = np.linalg.solve(a, cross / sd + penalty * prior)
        coef = coef_s / sd
        self.coef_ = np.r_[zmean - mean @ coef, coef]

    def _step(
        self, batch: ReadingBatch | pd.DataFrame, learn: bool
    ) -> tuple[Floats, Floats, Floats]:
        ids, ts, ts_ns, data = self._arrays(batch)
        self.state_.update_arrays(ids, ts_ns, data)
        z, loc, scale, fallback, persistence = self._design(ids, ts)
        s = self._standardise(z)
        yhat = self._forecast(s, loc, scale, fallback)
        y = data[:, 0]
        if learn:
            self._learn(s, loc, scale, y)
        return yhat, y, persistence

    # ------------------------------------------------------------------ API

    def predict_many(self, batch: ReadingBatch | pd.DataFrame) -> Floats:
        """Forecasts for every row of ``batch`` (``horizon`` steps ahead), always finite.

        Row ``t`` is forecast from values at ``<= t - horizon`` (earlier rows
        of the batch included; its own ``value`` never). The batch's readings
        are stored in the feature state, which is idempotent: storing the
        same readings again in :meth:`learn_many` changes nothing. The model
        itself does not change.
        """
        yhat, _, _ = self._step(batch, learn=False)
        return yhat

    def learn_many(self, batch: ReadingBatch | pd.DataFrame) -> Self:
        """Store the batch's readings and update the model with its rows; returns ``self``.

        Rows with a missing value, or without any history for their meter,
        teach nothing (their readings still feed later features).
        """
        self._step(batch, learn=True)
        return self

    def predict_learn_many(self, batch: ReadingBatch | pd.DataFrame) -> Floats:
        """:meth:`predict_many` then :meth:`learn_many` with one feature computation."""
        yhat, _, _ = self._step(batch, learn=True)
        return yhat

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
            yhat, y, pers = self._step(batch, learn=True)
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

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: JSON-able numbers, strings and NumPy arrays."""
        params = self.get_params()
        spec = params["features"]
        params["features"] = None if spec is None else dataclasses.asdict(spec)
        out: dict[str, Any] = {"version": _STATE_VERSION, "params": params}
        if not self.is_fitted:
            return out
        st = self.state_
        out.update(
            freq_ns=int(self.freq_.value),
            horizon=int(self.horizon_),
            covariates=list(self.covariates_),
            origin_ns=None if st.origin is None else int(st.origin.value),
            meters=list(st.meters),
            length=int(st.length),
            values=st._values.copy(),
            covs=st._covs.copy(),
            end=st._end.copy(),
            xtx=self.xtx_.copy(),
            xtz=self.xtz_.copy(),
            coef=self.coef_.copy(),
            res_ms=float(self.res_ms_),
            y_mean=float(self.y_mean_),
            rows_seen=int(self.rows_seen_),
        )
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> OnlineForecaster:
        """A model identical to the one whose :meth:`state_dict` gave ``state``."""
        if state.get("version") != _STATE_VERSION:
            raise InputError(f"unsupported online model state version {state.get('version')!r}")
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
        freq = pd.Timedelta(int(state["freq_ns"]), unit="ns")
        covs = tuple(str(c) for c in state["covariates"])
        h = int(state["horizon"])
        model.freq_ = freq
        model.horizon_ = h
        model.covariates_ = covs
        model._set_plan(model.spec.plan(freq, h, covs))
        st = _StreamState(model.spec, freq, h, covs)
        origin = state["origin_ns"]
        st.origin = None if origin is None else pd.Timestamp(int(origin), tz="UTC")
        st._index = {str(m): i for i, m in enumerate(state["meters"])}
        st.length = int(state["length"])
        st._values = np.array(state["values"], dtype=np.float64).reshape(len(st._index), st.length)
        st._covs = np.array(state["covs"], dtype=np.float64).reshape(
            len(st._index), st.length, len(covs)
        )
        st._end = np.array(state["end"], dtype=np.int64)
        model.state_ = st
        model.xtx_ = np.array(state["xtx"], dtype=np.float64)
        model.xtz_ = np.array(state["xtz"], dtype=np.float64)
        model.coef_ = np.array(state["coef"], dtype=np.float64)
        model.res_ms_ = float(state["res_ms"])
        model.y_mean_ = float(state["y_mean"])
        model.rows_seen_ = int(state["rows_seen"])
        return model
