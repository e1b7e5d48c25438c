"""Meter clustering by normalised daily load profile.

Each meter becomes its mean 24-hour shape: the mean reading per local time
slot of the day (``bins`` slots), divided by the meter's overall mean, so a
6 kW office and a 1 kW office look alike. KMeans groups the shapes; ``k`` is
given or chosen by the best silhouette in ``k_range``. Meters without enough
data (a slot never read, or a mean of ~0) get cluster ``-1``.

>>> import numpy as np, pandas as pd
>>> ts = pd.date_range("2024-01-01", periods=24 * 7, freq="h", tz="UTC")
>>> hours = ts.hour.to_numpy()
>>> day = pd.DataFrame({"meter_id": "d1", "ts": ts, "value": 1.0 + (hours > 8) * (hours < 18)})
>>> night = pd.DataFrame({"meter_id": "n1", "ts": ts, "value": 1.0 + (hours < 6)})
>>> frames = [day, day.assign(meter_id="d2", value=day.value * 5), night]
>>> labels = cluster_meters(pd.concat(frames), k=2)
>>> bool(labels["d1"] == labels["d2"] != labels["n1"])
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.errors import ConfigError, InputError
from meterops.models.base import prepare_frame

__all__ = ["Clusters", "cluster_meters", "daily_profiles", "fit_clusters"]

Floats = npt.NDArray[np.float64]


def daily_profiles(frame: pd.DataFrame, timezone: str = "UTC", bins: int = 24) -> pd.DataFrame:
    """One row per meter: its mean reading per local slot of the day / its overall mean.

    Columns are the slot numbers ``0 .. bins - 1``; a slot never read is NaN.
    Missing and non-finite readings are skipped.
    """
    if bins < 1 or 1440 % bins:
        raise ConfigError(f"bins must divide the 1440 minutes of a day, got {bins}")
    df = prepare_frame(frame)
    v = pd.to_numeric(df["value"], errors="coerce").to_numpy(np.float64)
    ok = np.isfinite(v) & df["ts"].notna().to_numpy()
    df = df[ok]
    if df.empty:
        return pd.DataFrame(columns=range(bins), dtype=np.float64)
    local = df["ts"].dt.tz_convert(timezone)
    slot = ((local.dt.hour * 60 + local.dt.minute) // (1440 // bins)).to_numpy(np.int64)
    table = pd.DataFrame({"m": df["meter_id"].to_numpy(), "s": slot, "v": v[ok]})
    shape = table.pivot_table(index="m", columns="s", values="v", aggfunc="mean")
    shape = shape.reindex(columns=range(bins))
    level = shape.mean(axis=1)
    shape = shape.div(level.where(level.abs() > 1e-12), axis=0)
    shape.index.name = "meter_id"
    return shape


@dataclass(frozen=True)
class Clusters:
    """A fitted clustering: ``labels`` (meter_id -> cluster, ``-1`` = no usable profile),
    ``profiles`` (one row per cluster: its mean normalised daily profile, slots
    ``0 .. bins - 1``), ``k`` and the ``silhouette`` of the chosen ``k`` (None when
    it is undefined: one cluster, or as many clusters as meters)."""

    labels: pd.Series
    profiles: pd.DataFrame
    k: int
    silhouette: float | None

    def sizes(self) -> dict[int, int]:
        """Meters per cluster (``-1`` included when some meter has no profile)."""
        labels, counts = np.unique(self.labels.to_numpy(np.int64), return_counts=True)
        return {int(c): int(n) for c, n in zip(labels, counts, strict=True)}


def fit_clusters(
    frame: pd.DataFrame,
    *,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    timezone: str = "UTC",
    bins: int = 24,
    seed: int = 0,
) -> Clusters:
    """KMeans on the normalised daily profiles (see :func:`cluster_meters`), with the
    cluster profiles and the silhouette of the result."""
    from sklearn.cluster import KMeans  # type: ignore[import-untyped]
    from sklearn.metrics import silhouette_score  # type: ignore[import-untyped]

    if k is not None and k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    low, high = k_range
    if k is None and not 2 <= low <= high:
        raise ConfigError(f"k_range must be (low, high) with 2 <= low <= high, got {k_range}")
    shapes = daily_profiles(frame, timezone=timezone, bins=bins)
    usable = shapes.notna().all(axis=1)
    x: Floats = shapes[usable].to_numpy(np.float64)
    result = pd.Series(-1, index=shapes.index, dtype=np.int64, name="cluster")
    if len(x) == 0:
        raise InputError("no meter has a complete daily profile to cluster")
    distinct = len(np.unique(np.round(x, 9), axis=0))
    quality: float | None = None
    if k is None:
        candidates = [c for c in range(low, high + 1) if c < min(len(x), distinct + 1)]
        best: tuple[float, Floats] | None = None
        for c in candidates:
            labels = KMeans(n_clusters=c, n_init=10, random_state=seed).fit_predict(x)
            if len(np.unique(labels)) < 2:
                continue
            score = float(silhouette_score(x, labels))
            if best is None or score > best[0]:
                best = (score, labels)
        if best is None:
            chosen: Floats = np.zeros(len(x), dtype=np.int64)
        else:
            quality, chosen = best
    else:
        if k > len(x):
            raise ConfigError(f"k={k} is more than the {len(x)} meters with a usable profile")
        chosen = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        if 1 < len(np.unique(chosen)) < len(x):
            quality = float(silhouette_score(x, chosen))
    result[usable] = np.asarray(chosen, dtype=np.int64)
    found = np.asarray(chosen, dtype=np.int64)
    profiles = pd.DataFrame(x, columns=shapes.columns).groupby(found).mean()
    profiles.index.name = "cluster"
    return Clusters(result, profiles, len(profiles), quality)


def cluster_meters(
    frame: pd.DataFrame,
    *,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    timezone: str = "UTC",
    bins: int = 24,
    seed: int = 0,
) -> pd.Series:
    """``meter_id -> cluster`` (int) from KMeans on the normalised daily profiles.

    With ``k=None`` every ``k`` in ``k_range`` (inclusive, capped at the number
    of usable meters minus one) is tried and the best silhouette wins; with
    one usable meter everything is cluster 0. Raises :class:`ConfigError` for
    a bad ``k`` and :class:`InputError` when no meter has a usable profile.
    """
    return fit_clusters(frame, k=k, k_range=k_range, timezone=timezone, bins=bins, seed=seed).labels
