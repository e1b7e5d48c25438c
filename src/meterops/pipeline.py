"""The composition root: the only module that wires bus, store, lake and rules together.

A reading's path: a source publishes a :class:`ReadingBatch` to the
``readings`` topic (:meth:`Pipeline.publish`); a :class:`Worker` polls
micro-batches, validates them, writes good rows and dead letters to the store
in one transaction, exports the new rows to the lake, publishes dead letters
to the ``deadletters`` topic and only then commits the bus offsets. A crash
anywhere before the commit means redelivery, and the store's idempotent
write turns that into exactly-once results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa

from meterops.backends import make_bus, make_store
from meterops.bus.base import DEADLETTERS, READINGS, TOPICS, Bus, Consumer, Producer
from meterops.errors import Unavailable
from meterops.lake import Lake
from meterops.settings import Settings, redact_url
from meterops.store.base import Store
from meterops.types import RAW, REJECT, Message, ReadingBatch, deadletter_table
from meterops.validate import validate

__all__ = ["BatchStats", "Pipeline", "Worker", "WorkerTotals", "commit_map"]

log = logging.getLogger("meterops.worker")
_T = TypeVar("_T")


@dataclass(frozen=True)
class BatchStats:
    """What one micro-batch did."""

    rows: int
    stored: int
    duplicates: int
    deadletters: int
    seconds: float


@dataclass
class WorkerTotals:
    """Running totals of one worker (mutable: the worker adds each batch)."""

    batches: int = 0
    rows: int = 0
    stored: int = 0
    duplicates: int = 0
    deadletters: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, s: BatchStats) -> None:
        self.batches += 1
        self.rows += s.rows
        self.stored += s.stored
        self.duplicates += s.duplicates
        self.deadletters += s.deadletters

    @property
    def rate(self) -> float:
        return self.rows / max(1e-9, time.monotonic() - self.started)


class Pipeline:
    """Opens the configured backends once and hands out the pieces that use them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._bus: Bus | None = None
        self._store: Store | None = None
        self._lake: Lake | None = None
        self._producer: Producer | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for part in (self._producer, self._bus, self._store, self._lake):
            if part is not None:
                part.close()
        self._producer = self._bus = self._store = self._lake = None

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            self._bus = make_bus(self.settings).open()
            self._bus.create_topics(TOPICS)
        return self._bus

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = make_store(self.settings).open()
        return self._store

    @property
    def lake(self) -> Lake:
        if self._lake is None:
            self._lake = Lake(self.settings.resolve(self.settings.backends.lake)).open()
        return self._lake

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = self.bus.producer()
        return self._producer

    def publish(self, batches: Iterable[ReadingBatch], topic: str = READINGS) -> Iterator[int]:
        """Send each batch to ``topic``; yields the rows sent per batch (for progress)."""
        for batch in batches:
            self.producer.send(topic, batch.table)
            yield len(batch)
        self.producer.flush()

    def worker(self) -> Worker:
        return Worker(self)

    def status(self) -> dict[str, Any]:
        """Counts and lag, the shape ``meterops status --format json`` prints."""
        counts = self.store.counts()
        group = self.settings.worker.group
        return {
            "readings": counts.readings,
            "meters": counts.meters,
            "deadletters": counts.deadletters,
            "deadletters_by_reason": counts.deadletters_by_reason,
            "lag": self.bus.lag(group, READINGS),
            "published": sum(self.bus.end_offsets(READINGS).values()),
            "last_ts": None if counts.last_ts is None else counts.last_ts.isoformat(),
            "backends": {
                "bus": redact_url(self.settings.backends.bus),
                "store": redact_url(self.settings.backends.store),
                "lake": redact_url(self.settings.backends.lake),
            },
        }

    def replay_deadletters(
        self, ids: Iterable[int] | None = None, reason: str | None = None
    ) -> int:
        """Send dead letters back to ``readings`` (after a fix in the rules or data).

        The rows go through validation again; rows that still fail get a new
        dead letter. The old ones are flagged replayed. Returns rows sent.
        """
        frame = self.store.deadletters(reason=reason)
        if ids is not None:
            frame = frame[frame["id"].isin(list(ids))]
        if frame.empty:
            return 0
        batch = _deadletters_as_readings(frame)
        self.producer.send(READINGS, batch.table)
        self.producer.flush()
        self.store.mark_replayed(frame["id"].tolist())
        return len(batch)


def _deadletters_as_readings(frame: pd.DataFrame) -> ReadingBatch:
    """Re-parse dead letters' text fields; what still cannot parse keeps its reason."""
    ts = pd.to_datetime(frame["ts"], utc=True, errors="coerce", format="ISO8601")
    value = pd.to_numeric(frame["value"], errors="coerce")
    unparsable_value = value.isna() & frame["value"].notna() & (frame["value"] != "nan")
    reject = np.full(len(frame), None, dtype=object)
    reject[unparsable_value.to_numpy()] = "unparseable value"
    reject[ts.isna().to_numpy()] = "missing timestamp"
    table = pa.table(
        {
            "meter_id": pa.array(frame["meter_id"], pa.string()),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "value": pa.array(value, pa.float64()),
            REJECT: pa.array(reject, pa.string()),
            RAW: pa.array(frame["raw"], pa.string()),
        }
    )
    return ReadingBatch(table)


class Worker:
    """Consumes ``readings`` in micro-batches: validate, store, lake, then commit."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.totals = WorkerTotals()
        self.retries = 0
        self._consumer: Consumer | None = None
        self._registered: set[str] | None = None
        self._registered_at = 0.0

    def _open(self) -> Consumer:
        if self._consumer is None:
            self._finish_lake_exports()
            self._consumer = self.pipeline.bus.consumer(self.settings.worker.group, [READINGS])
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _finish_lake_exports(self) -> None:
        """Export batches a crashed worker stored but did not finish writing to the lake."""
        store, lake = self.pipeline.store, self.pipeline.lake
        for batch_id in store.pending_lake_batches():
            lake.write(store.batch_readings(batch_id), batch_id)
            store.lake_done(batch_id)

    def _registered_meters(self) -> set[str] | None:
        if not self.settings.validation.require_registration:
            return None
        if self._registered is None or time.monotonic() - self._registered_at > 5:
            self._registered = self.pipeline.store.registered_meters()
            self._registered_at = time.monotonic()
        return self._registered

    def process(self, messages: list[Message]) -> BatchStats:
        """Validate and store one micro-batch; the caller commits afterwards."""
        started = time.perf_counter()
        batch = ReadingBatch.concat(m.batch for m in messages)
        lengths = [len(m) for m in messages]
        sources = np.repeat(np.array([f"{m.topic}/{m.partition}" for m in messages]), lengths)
        offsets = np.concatenate([m.row_offsets() for m in messages])
        checked = validate(
            batch, self.settings.validation, pd.Timestamp.now(tz="UTC"), self._registered_meters()
        )
        rejected = checked.rejected_rows
        dead = deadletter_table(
            batch.take(pa.array(rejected, pa.int64())),
            checked.reasons[rejected],
            sources[rejected],
            offsets[rejected],
        )
        origins = pa.table(
            {"source": sources[checked.good_rows], "offset": offsets[checked.good_rows]}
        )
        lineage = {
            "offsets": {f"{m.topic}/{m.partition}": [m.offset, m.next_offset] for m in messages}
        }
        store = self.pipeline.store
        result = store.write(checked.good, dead, lineage, origins)
        new_rows = checked.good.filter(pa.array(result.new_mask))
        self.pipeline.lake.write(new_rows, result.batch_id)
        store.lake_done(result.batch_id)
        if dead.num_rows:
            self.pipeline.producer.send(DEADLETTERS, dead)
        return BatchStats(
            rows=len(batch),
            stored=result.inserted,
            duplicates=checked.duplicates + result.duplicates,
            deadletters=result.deadletters,
            seconds=time.perf_counter() - started,
        )

    def step(self, timeout: float | None = None) -> BatchStats | None:
        """Poll once, process and commit; None when nothing arrived within ``timeout``.

        An unreachable bus or store (:class:`Unavailable`) is retried with
        exponential backoff for up to ``worker.retry_for`` seconds: the same
        micro-batch is written again, which the idempotent store makes safe.
        """
        wait = self.settings.worker.poll_timeout if timeout is None else timeout
        messages = self._retrying(
            "poll", lambda: self._open().poll(self.settings.worker.batch_rows, wait)
        )
        if not messages:
            return None
        stats = self._retrying("store", lambda: self.process(messages))
        self._retrying("commit", lambda: self._open().commit(commit_map(messages)))
        self.totals.add(stats)
        return stats

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T:
        delay, waited = 0.1, 0.0
        while True:
            try:
                return call()
            except Unavailable as exc:
                if waited >= self.settings.worker.retry_for:
                    raise
                pause = delay
                log.warning("%s unavailable (%s); retrying in %.1f s", what, exc, pause)
                self.retries += 1
                time.sleep(pause)
                waited += pause
                delay = min(delay * 2, 10.0)

    def run(
        self,
        until_idle: bool = False,
        stop: threading.Event | None = None,
        on_batch: Callable[[BatchStats, WorkerTotals], None] | None = None,
    ) -> WorkerTotals:
        """Process until ``stop`` is set, or until nothing is waiting with ``until_idle``."""
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                stats = self.step()
                if stats is None:
                    if until_idle:
                        break
                    continue
                if on_batch is not None:
                    on_batch(stats, self.totals)
        finally:
            self.close()
        return self.totals


def commit_map(messages: Iterable[Message]) -> Mapping[tuple[str, int], int]:
    """Next offset per partition covered by ``messages``."""
    out: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        out[key] = max(out.get(key, 0), m.next_offset)
    return out
