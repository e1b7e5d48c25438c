"""The online model in the stream: one learner per bus partition, checkpointed with each batch.

Why per partition: a partition is the unit a consumer group hands from one
worker to another, and meters never change partition, so a learner's state
moves with its partition on a rebalance or a restart and no two workers ever
update the same state. Each learner is an
:class:`~meterops.models.online.OnlineForecaster` scored prequentially (predict the
micro-batch, score it, then learn it); the batch's metrics (as sums) and the
learner's checkpoint go into the store in the same transaction as the
readings, keyed by the bus position, so:

* a batch redelivered after a crash is not learned twice: the checkpoint
  records the next bus offset learned per partition and older messages are
  skipped (their readings still enter the feature buffers, which is
  idempotent);
* a worker taking over a partition resumes from its last checkpoint; the
  feature buffers are rebuilt from the store's recent readings (no learning).

With no checkpoint a learner warms up by learning the stored recent history
of its meters (metrics are recorded from the stream only).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from meterops.errors import ConfigError, InputError
from meterops.models.online import OnlineForecaster
from meterops.store.base import Checkpoint, RecentReadings, Store
from meterops.types import ONLINE_METRIC_SCHEMA

__all__ = ["WARMUP", "OnlineLearners", "pack_state", "unpack_state"]

log = logging.getLogger("meterops.stream")

WARMUP = pd.Timedelta("8d")  # history a new learner reads before its frequency is known
ONLINE_LABEL = "online"


def pack_state(state: Mapping[str, Any]) -> bytes:
    """A state dict as ``.npz`` bytes: arrays as arrays, the rest as one JSON document."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    buffer = io.BytesIO()
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def unpack_state(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`pack_state` (never unpickles)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        out: dict[str, Any] = json.loads(str(npz["__meta__"]))
        for key in npz.files:
            if key != "__meta__":
                out[key] = npz[key]
    return out


class OnlineLearners:
    """The online learners of the partitions one worker owns, loaded lazily from the store."""

    def __init__(self, store: Store, group: str) -> None:
        self.store = store
        self.group = group
        self._models: dict[str, OnlineForecaster] = {}
        self._next: dict[str, int] = {}
        self._seen: dict[str, set[str]] = {}

    def name(self, source: str) -> str:
        return f"online/{self.group}/{source}"

    @staticmethod
    def _history(
        history: RecentReadings, model: OnlineForecaster, meters: list[str], end: pd.Timestamp
    ) -> pd.DataFrame:
        span = WARMUP
        if model.is_fitted:
            span = model.freq_ * (model.state_.length + 1)
        return history.get(meters, end - span, end)

    def _learner(self, source: str) -> OnlineForecaster:
        model = self._models.get(source)
        if model is not None:
            return model
        saved = self.store.checkpoint(self.name(source))
        if saved is None:
            model = OnlineForecaster()
            self._next[source] = -1
        else:
            try:
                model = OnlineForecaster.from_state(unpack_state(saved.state))
                self._next[source] = int(saved.offsets.get(source, -1))
            except InputError as exc:  # an older state format: learn afresh, keep the position
                log.warning("online checkpoint %s not loaded (%s); starting afresh", source, exc)
                model = OnlineForecaster()
                self._next[source] = int(saved.offsets.get(source, -1))
        self._models[source] = model
        self._seen[source] = set()
        return model

    def _prime(
        self, source: str, model: OnlineForecaster, part: pd.DataFrame, stored: RecentReadings
    ) -> None:
        """Bring meters new to this learner up to date from the store before their batch."""
        meters = [m for m in pd.unique(part["meter_id"]) if m not in self._seen[source]]
        if not meters:
            return
        history = self._history(stored, model, [str(m) for m in meters], part["ts"].min())
        self._seen[source].update(str(m) for m in meters)
        if history.empty:
            return
        if model.is_fitted:
            model.observe(history)
        else:
            model.learn_many(history)

    def step(
        self,
        frame: pd.DataFrame,
        sources: npt.NDArray[Any],
        message_next: npt.NDArray[np.int64],
        now_us: int,
        stored: RecentReadings,
    ) -> tuple[pa.Table, list[Checkpoint]]:
        """Predict, score and learn the valid readings of one micro-batch, per partition.

        ``sources`` and ``message_next`` (the next offset of each row's
        message) are aligned with ``frame``; ``stored`` serves the warm-up
        history of meters a learner has not seen. Returns the metrics rows
        (``ONLINE_METRIC_SCHEMA``) and the checkpoints to store with the batch.
        """
        rows: list[dict[str, Any]] = []
        checkpoints: list[Checkpoint] = []
        for source in pd.unique(sources):
            mask = sources == source
            model = self._learner(str(source))
            fresh = mask & (message_next > self._next[str(source)])
            if not fresh.any():
                continue
            part = frame[fresh].sort_values("ts", kind="stable")
            try:
                self._prime(str(source), model, part, stored)
                metrics = model.prequential([part])[0]
            except ConfigError as exc:
                # too little data to tell the frequency yet: learn nothing now; these
                # readings are stored, so the next batch's warm-up reads them back
                log.info("online learner %s waits for more data: %s", source, exc)
                self._seen[str(source)].clear()
                continue
            n = int(metrics["n"] or 0)
            rows.append(
                {
                    "model": ONLINE_LABEL,
                    "source": str(source),
                    "offset": int(self._next[str(source)]),
                    "recorded_at": now_us,
                    "n": n,
                    "sse": _sum_sq(metrics["rmse"], n),
                    "sae": (metrics["mae"] or 0.0) * n,
                    "persistence_sse": _sum_sq(metrics["persistence_rmse"], n),
                    "persistence_sae": (metrics["persistence_mae"] or 0.0) * n,
                }
            )
            self._next[str(source)] = int(message_next[fresh].max())
            checkpoints.append(self._checkpoint(str(source), model))
        table = pa.Table.from_pylist(rows, schema=ONLINE_METRIC_SCHEMA)
        return table, checkpoints

    def _checkpoint(self, source: str, model: OnlineForecaster) -> Checkpoint:
        state = model.state_dict(buffers=False)
        return Checkpoint(self.name(source), pack_state(state), {source: self._next[source]})

    def drop(self, keep: Iterable[str]) -> None:
        """Forget learners of partitions this worker no longer owns (after a rebalance)."""
        wanted = set(keep)
        for source in [s for s in self._models if s not in wanted]:
            del self._models[source]
            self._next.pop(source, None)
            self._seen.pop(source, None)


def _sum_sq(rmse: Any, n: int) -> float:
    return 0.0 if rmse is None or n == 0 else float(rmse) ** 2 * n if math.isfinite(rmse) else 0.0
