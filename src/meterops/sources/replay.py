"""Replay: a batch of readings in timestamp order, as fast as possible or paced.

Pacing maps data time onto wall time: at ``speed`` X, a reading stamped ``d``
after the first one is released ``d / X`` after the replay started, in chunks
cut every ``tick`` seconds, so a slow consumer never changes what is sent when.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meterops.types import ReadingBatch

__all__ = ["in_time_order", "paced"]


def in_time_order(batch: ReadingBatch) -> ReadingBatch:
    """Rows sorted by timestamp (stable, so ties keep file order); unparseable ones first."""
    if len(batch) == 0:
        return batch
    ts = pc.fill_null(pc.cast(batch.table.column("ts"), pa.int64()), np.iinfo(np.int64).min)
    order = np.argsort(ts.to_numpy(zero_copy_only=False), kind="stable")
    return batch.take(pa.array(order))


def paced(
    batch: ReadingBatch,
    speed: float | None = None,
    chunk_rows: int = 100_000,
    tick: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[ReadingBatch]:
    """Yield ``batch`` (already in time order) in chunks; paced when ``speed`` is set."""
    n = len(batch)
    if speed is None or n == 0:
        for start in range(0, n, chunk_rows):
            yield batch.take(pa.array(np.arange(start, min(n, start + chunk_rows))))
        return
    if speed <= 0:
        raise ValueError("speed must be positive (e.g. 1 for real time, 3600 for an hour per s)")
    missing = np.iinfo(np.int64).min
    ts_col = pc.cast(batch.table.column("ts"), pa.int64())
    ts = pc.fill_null(ts_col, missing).to_numpy(zero_copy_only=False)
    valid = ts != missing
    first = int(ts[valid].min()) if valid.any() else 0
    started = clock()
    sent = 0
    while sent < n:
        elapsed_us = (clock() - started) * speed * 1e6
        cut = int(np.searchsorted(ts, first + elapsed_us, side="right"))
        cut = min(max(cut, sent), sent + chunk_rows)
        if cut > sent:
            yield batch.take(pa.array(np.arange(sent, cut)))
            sent = cut
        else:
            sleep(tick)
