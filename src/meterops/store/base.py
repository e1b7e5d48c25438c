"""The store role: readings keyed by (meter, ts), dead letters, meters, ingest batches.

Promises every implementation keeps (checked by ``tests/contracts/test_store.py``):

* ``write`` is one transaction and idempotent: a reading already stored with
  the same value is skipped (counted as a duplicate), one stored with a
  different value is turned into a dead letter ("duplicate with a different
  value"), dead letters are unique by (source, offset). So a batch delivered
  twice by an at-least-once bus leaves the store exactly as delivering it once.
* Each ``write`` records an ingest batch (its lineage: bus offsets) and marks
  it lake-pending; the worker exports the new rows to the lake and then calls
  ``lake_done``. A crash in between leaves the batch pending and
  ``pending_lake_batches`` lets the next worker finish the export.
* What the stream scored with a batch (:class:`Scored`: predictions, anomaly
  scores, online-model metrics and state checkpoints) is written in the same
  transaction. Predictions and scores are insert-if-absent by key, so a
  redelivered batch keeps the first verdict (and its model version); the
  actual of every prediction is filled in as soon as both the prediction and
  the reading for its ``target_ts`` are stored, whichever comes first, which
  is what live accuracy (:meth:`Store.accuracy`) is computed from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import numpy as np
import pandas as pd
import pyarrow as pa

from meterops.types import ReadingBatch

__all__ = [
    "DUPLICATE_REASON",
    "Checkpoint",
    "RecentReadings",
    "Scored",
    "Store",
    "StoreCounts",
    "WriteResult",
]

DUPLICATE_REASON = "duplicate with a different value"
_PER_METER_READS = 50  # above this many meters, one range query beats one query per meter


@dataclass(frozen=True)
class Checkpoint:
    """Opaque state saved with a batch: ``state`` bytes plus the JSON-able ``offsets`` it covers."""

    name: str
    state: bytes
    offsets: Mapping[str, int]


class RecentReadings:
    """Stored readings read at most once per micro-batch for every part that warms meters up.

    A worker meeting a fleet for the first time (at start, after a
    rebalance) must load each meter's recent history into the champion's
    feature buffers and into the online learners. One query per meter costs
    a round trip each; one range query per consumer read the same rows
    several times. So many meters are served from one range read
    ``[start, end)`` fetched on first use and shared; a few meters are read
    one by one.
    """

    def __init__(self, store: Store, start: pd.Timestamp, end: pd.Timestamp) -> None:
        self.store = store
        self.start = start
        self.end = end
        self._all: pd.DataFrame | None = None

    def get(self, meters: Sequence[str], start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
        """Readings of ``meters`` in ``[start, end)``, ordered by meter and time."""
        if len(meters) > _PER_METER_READS and self.start <= start and end <= self.end:
            if self._all is None:
                self._all = self.store.readings(start=self.start, end=self.end).to_pandas()
            frame = self._all
            keep = frame["meter_id"].isin(meters) & (frame["ts"] >= start) & (frame["ts"] < end)
            return frame[keep].reset_index(drop=True)
        return _per_meter(
            meters, lambda m: self.store.readings(meter_id=m, start=start, end=end).to_pandas()
        )

    def scores(self, meters: Sequence[str], start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
        """Stored anomaly scores of ``meters`` for readings in ``[start, end)``."""
        if len(meters) > _PER_METER_READS:
            frame = self.store.scores(start=start, end=end)
            return frame[frame["meter_id"].isin(meters)].reset_index(drop=True)
        return _per_meter(meters, lambda m: self.store.scores(meter_id=m, start=start, end=end))


def _per_meter(meters: Sequence[str], read: Callable[[str], pd.DataFrame]) -> pd.DataFrame:
    parts = [part for part in (read(m) for m in meters) if len(part)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


@dataclass(frozen=True)
class Scored:
    """What the stream computed for one micro-batch, stored with it in one transaction.

    Tables follow ``types.PREDICTION_SCHEMA``, ``types.SCORE_SCHEMA`` and
    ``types.ONLINE_METRIC_SCHEMA``; any of them may be empty.
    """

    predictions: pa.Table
    scores: pa.Table
    online_metrics: pa.Table
    checkpoints: Sequence[Checkpoint] = ()


@dataclass(frozen=True)
class WriteResult:
    """What one ``write`` did. ``new_mask`` marks the rows of ``good`` that were new.

    ``predictions``/``scores`` count rows inserted (a redelivery inserts 0);
    ``actuals`` counts predictions whose actual was filled in by this write.
    """

    batch_id: int
    inserted: int
    duplicates: int
    deadletters: int
    new_mask: np.ndarray = field(repr=False)
    predictions: int = 0
    scores: int = 0
    actuals: int = 0


@dataclass(frozen=True)
class StoreCounts:
    readings: int
    meters: int
    deadletters: int
    deadletters_by_reason: dict[str, int]
    last_ts: pd.Timestamp | None
    predictions: int = 0
    anomalies: int = 0


class Store(ABC):
    """See the module docstring. Open with ``open()`` or ``with store.open():``."""

    def open(self) -> Self:
        """Connect and apply schema migrations; call before anything else."""
        return self

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def write(
        self,
        good: ReadingBatch,
        dead: pa.Table,
        lineage: Mapping[str, Any],
        origins: pa.Table | None = None,
        scored: Scored | None = None,
    ) -> WriteResult:
        """Store validated readings and dead letters in one transaction.

        ``good`` holds no two rows with the same (meter, ts); ``dead`` follows
        ``types.DEADLETTER_SCHEMA``; ``lineage`` is JSON-able (bus offsets);
        ``origins`` (columns source, offset, aligned with ``good``) keys the
        dead letters made here from conflicting duplicates, so a redelivery
        does not record them twice. ``scored`` is stored in the same
        transaction (see the module docstring); checkpoints replace the ones
        of the same name.
        """

    @abstractmethod
    def readings(
        self,
        meter_id: str | None = None,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> ReadingBatch:
        """Readings ordered by meter and time; ``end`` is exclusive."""

    @abstractmethod
    def deadletters(
        self, reason: str | None = None, limit: int | None = None, replayed: bool = False
    ) -> pd.DataFrame:
        """Dead letters, newest first, with ``id`` and ``received_at``."""

    @abstractmethod
    def mark_replayed(self, ids: Sequence[int]) -> int:
        """Flag dead letters as replayed (they stay listed with ``replayed=True``)."""

    @abstractmethod
    def counts(self) -> StoreCounts: ...

    @abstractmethod
    def meters(self) -> pd.DataFrame:
        """One row per meter: ``meter_id, first_ts, last_ts, readings, registered, cluster``.

        ``cluster`` is the load-profile cluster (nullable int) set by :meth:`set_clusters`.
        """

    @abstractmethod
    def set_clusters(self, clusters: Mapping[str, int]) -> None:
        """Record each meter's load-profile cluster (meters not stored yet are added)."""

    @abstractmethod
    def predictions(
        self,
        meter_id: str | None = None,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
        horizon: int | None = None,
    ) -> pd.DataFrame:
        """Stored predictions with ``start <= ts < end``: ``PREDICTION_SCHEMA`` columns
        plus ``actual`` (NaN until the reading for ``target_ts`` is stored), ordered by
        meter, ts, horizon."""

    @abstractmethod
    def scores(
        self,
        meter_id: str | None = None,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
        anomalies_only: bool = False,
    ) -> pd.DataFrame:
        """Stored anomaly scores (``SCORE_SCHEMA`` columns) ordered by meter and ts."""

    @abstractmethod
    def accuracy(self, since: pd.Timestamp | None = None, by_meter: bool = True) -> pd.DataFrame:
        """Live accuracy of predictions whose actual is known (``target_ts >= since``).

        Columns ``meter_id`` (only with ``by_meter``), ``horizon``, ``n``,
        ``rmse``, ``mae``, ``coverage`` (share of actuals within ``[q10, q90]``),
        one row per (meter, horizon), or per horizon without ``by_meter``.
        """

    @abstractmethod
    def online_metrics(self, model: str | None = None, limit: int | None = None) -> pd.DataFrame:
        """Online-model metrics per micro-batch (``ONLINE_METRIC_SCHEMA``), oldest first."""

    @abstractmethod
    def checkpoint(self, name: str) -> Checkpoint | None:
        """The last checkpoint saved under ``name``, or None."""

    @abstractmethod
    def checkpoints(self, prefix: str) -> list[Checkpoint]:
        """The last checkpoint of every name starting with ``prefix`` (exact, case-sensitive).

        In name order. How one process gathers the state of a whole consumer
        group (e.g. every partition's online learner, ``online/{group}/``)
        without knowing the partitions in advance.
        """

    @abstractmethod
    def register_meters(self, meter_ids: Sequence[str]) -> None:
        """Declare meters (needed when validation requires registration)."""

    @abstractmethod
    def registered_meters(self) -> set[str]: ...

    @abstractmethod
    def pending_lake_batches(self) -> list[int]: ...

    @abstractmethod
    def batch_readings(self, batch_id: int) -> ReadingBatch:
        """The readings first stored by ingest batch ``batch_id``."""

    @abstractmethod
    def lake_done(self, batch_id: int) -> None: ...
