"""The composition root: the only module that wires bus, store, lake and rules together.

A reading's path: a source publishes a :class:`ReadingBatch` to the
``readings`` topic (:meth:`Pipeline.publish`); a :class:`Worker` polls
micro-batches, validates them, scores the valid readings with the champion
and the online learners (:mod:`meterops.stream`, :mod:`meterops.online_stream`),
writes readings, dead letters, predictions, scores, online metrics and
checkpoints to the store in one transaction, exports the new rows to the
lake, publishes predictions and dead letters to their topics and only then
commits the bus offsets. A crash anywhere before the commit means
redelivery, and the store's idempotent write turns that into exactly-once
results.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from meterops.backends import make_bus, make_store
from meterops.bus.base import (
    DEADLETTERS,
    PREDICTIONS,
    READINGS,
    TOPICS,
    Bus,
    Consumer,
    Producer,
)
from meterops.errors import ConfigError, Unavailable
from meterops.lake import Lake
from meterops.models.compiled import cores_reserved
from meterops.settings import Settings, redact_url
from meterops.store.base import RecentReadings, Scored, Store
from meterops.types import (
    ONLINE_METRIC_SCHEMA,
    PREDICTION_SCHEMA,
    RAW,
    REJECT,
    SCORE_SCHEMA,
    Message,
    ReadingBatch,
    deadletter_table,
)
from meterops.validate import validate

__all__ = [
    "BatchStats",
    "Pipeline",
    "Worker",
    "WorkerTotals",
    "commit_map",
    "retrying",
    "store_prepared",
]

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
    predictions: int = 0
    anomalies: int = 0
    model: str | None = None


@dataclass
class WorkerTotals:
    """Running totals of one worker (mutable: the worker adds each batch)."""

    batches: int = 0
    rows: int = 0
    stored: int = 0
    duplicates: int = 0
    deadletters: int = 0
    predictions: int = 0
    anomalies: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, s: BatchStats) -> None:
        self.batches += 1
        self.rows += s.rows
        self.stored += s.stored
        self.duplicates += s.duplicates
        self.deadletters += s.deadletters
        self.predictions += s.predictions
        self.anomalies += s.anomalies

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
            bus = make_bus(self.settings).open()
            try:
                bus.create_topics(TOPICS)
            except BaseException:
                bus.close()
                raise
            self._bus = bus
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
        """Send each batch to ``topic``; yields the rows sent per batch (for progress).

        A bus that cannot be reached yet (a broker restarting) is waited for
        like the worker waits, ``worker.retry_for`` s; once connected, the
        client itself queues and retries the sends.
        """
        producer = retrying(self.settings.worker.retry_for, "bus", lambda: self.producer)
        for batch in batches:
            producer.send(topic, batch.table)
            yield len(batch)
        producer.flush()

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
            "predictions": counts.predictions,
            "anomalies": counts.anomalies,
            "lag": self.bus.lag(group, READINGS),
            "workers": {
                member: sorted(f"{t}/{p}" for t, p in parts)
                for member, parts in self.bus.group_members(group).items()
            },
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


@dataclass
class Prepared:
    """A validated, scored micro-batch, ready for the one store transaction."""

    rows: int
    good: ReadingBatch
    dead: pa.Table
    lineage: dict[str, Any]
    origins: pa.Table
    duplicates: int
    scored: Scored | None
    model: str | None


class Worker:
    """Consumes ``readings`` in micro-batches: validate, score, store, lake, then commit."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.totals = WorkerTotals()
        self.retries = 0
        self._consumer: Consumer | None = None
        self._registered: set[str] | None = None
        self._registered_at = 0.0
        self._scoring = self.settings.scoring.enabled
        self._watcher: Any = None
        self._scorer: Any = None
        self._online: Any = None
        self._assignment: frozenset[tuple[str, int]] = frozenset()
        self._writer: _Writer | None = None
        self._online_log: Any = None
        self._pending: tuple[Future[BatchStats], list[Message], float] | None = None

    def _open(self) -> Consumer:
        if self._consumer is None:
            self._finish_lake_exports()
            if self._scoring and self._watcher is None:
                self._start_scoring()
            self._consumer = self.pipeline.bus.consumer(self.settings.worker.group, [READINGS])
        return self._consumer

    def _start_scoring(self) -> None:
        """Champion watcher and online learners (optional parts: missing extras disable them)."""
        from meterops.online_stream import OnlineLearners

        scoring, group = self.settings.scoring, self.settings.worker.group
        if scoring.online:
            self._online = OnlineLearners(self.pipeline.store, group)
            if scoring.online_registry_every > 0:
                from meterops.online_registry import OnlineRegistryLog

                self._online_log = OnlineRegistryLog(self.settings, self.pipeline.store, group)
        try:
            from meterops.stream import ChampionWatcher
        except ImportError as exc:  # the registry extra is not installed
            log.warning("no champion scoring: %s", exc)
            return
        self._watcher = ChampionWatcher(self.settings)
        self._watcher.start()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._online_log is not None:
            self._online_log.close()
            self._online_log = None

    @property
    def _compiled_dir(self) -> Path:
        from meterops.models.compiled import cache_dir

        return cache_dir()

    def warm(self, timeout: float = 600.0) -> bool:
        """Wait until the champion's compiled predictors serve (or compiling gave up).

        For benchmarks and demos that want steady-state numbers; scoring never waits.
        """
        compiled = getattr(self._scorer, "compiled", None)  # GBM champions only
        return True if compiled is None else bool(compiled.wait(timeout))

    @property
    def model(self) -> str | None:
        """The label of the champion this worker scores with (None: not scoring)."""
        return None if self._scorer is None else str(self._scorer.label)

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

    def _switch_champion(self) -> None:
        """Between two micro-batches: adopt a newly promoted champion (hot reload)."""
        if self._watcher is None:
            return
        loaded = self._watcher.take()
        if loaded is None:
            return
        from meterops.stream_online import make_scorer

        try:
            self._scorer = make_scorer(loaded, self.settings.scoring, self._compiled_dir)
        except ConfigError as exc:
            log.warning("%s; readings are stored unscored", exc)
            self._scorer = None
            return
        log.info("scoring with %s", loaded.label)

    def _follow_assignment(self) -> None:
        """After a rebalance, forget state of partitions that may have moved meanwhile."""
        consumer = self._consumer
        if consumer is None:
            return
        owned = frozenset(consumer.assignment())
        if owned == self._assignment:
            return
        if self._assignment and self._scorer is not None:
            from meterops.stream_online import make_scorer

            self._scorer = make_scorer(
                self._scorer.loaded, self.settings.scoring, self._compiled_dir
            )
        if self._online is not None:
            self._online.drop(f"{t}/{p}" for t, p in owned)
        self._assignment = owned

    def prepare(self, messages: list[Message]) -> Prepared:
        """Validate and score one micro-batch (no store write yet)."""
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
        good_sources = sources[checked.good_rows]
        good_offsets = offsets[checked.good_rows]
        origins = pa.table({"source": good_sources, "offset": good_offsets})
        lineage = {
            "offsets": {f"{m.topic}/{m.partition}": [m.offset, m.next_offset] for m in messages}
        }
        scored = None
        if self._scoring and len(checked.good):
            nexts = np.repeat(np.array([m.next_offset for m in messages], np.int64), lengths)
            scored = self._score(checked.good, good_sources, good_offsets, nexts[checked.good_rows])
        return Prepared(
            rows=len(batch),
            good=checked.good,
            dead=dead,
            lineage=lineage,
            origins=origins,
            duplicates=checked.duplicates,
            scored=scored,
            model=self.model,
        )

    def _score(
        self,
        good: ReadingBatch,
        sources: np.ndarray,
        offsets: np.ndarray,
        message_next: np.ndarray,
    ) -> Scored:
        now = time.time_ns() // 1000
        stored = self._recent(good)
        predictions, scores = PREDICTION_SCHEMA.empty_table(), SCORE_SCHEMA.empty_table()
        if self._scorer is not None:
            self._scorer.prime(stored, good)
            predictions, scores = self._scorer.score(good, sources, offsets, now)
        metrics, checkpoints = ONLINE_METRIC_SCHEMA.empty_table(), []
        if self._online is not None:
            metrics, checkpoints = self._online.step(
                good.to_pandas(), sources, message_next, now, stored
            )
        return Scored(predictions, scores, metrics, checkpoints)

    def _recent(self, good: ReadingBatch) -> RecentReadings:
        """The stored history the scorer and the learners warm new meters up from (read once)."""
        from meterops.online_stream import WARMUP

        ts = good.table.column("ts")
        span = WARMUP if self._scorer is None else max(WARMUP, self._scorer.history_span)
        start = pd.Timestamp(pc.min(ts).as_py()) - span
        return RecentReadings(self.pipeline.store, start, pd.Timestamp(pc.max(ts).as_py()))

    def write(self, prepared: Prepared) -> BatchStats:
        """Store a prepared micro-batch in one transaction, then lake and topics."""
        return store_prepared(self.pipeline, prepared)

    def process(self, messages: list[Message]) -> BatchStats:
        """Validate, score and store one micro-batch; the caller commits afterwards."""
        started = time.perf_counter()
        stats = self.write(self.prepare(messages))
        return _with_seconds(stats, time.perf_counter() - started)

    def step(self, timeout: float | None = None) -> BatchStats | None:
        """Poll once, process and commit; None when nothing arrived within ``timeout``.

        An unreachable bus or store (:class:`Unavailable`) is retried with
        exponential backoff for up to ``worker.retry_for`` seconds: the same
        micro-batch is written again, which the idempotent store makes safe.
        Scoring happens once per delivery (the online learners must not learn
        a batch twice); only the store write is repeated.
        """
        wait = self.settings.worker.poll_timeout if timeout is None else timeout
        messages = self._retrying(
            "poll", lambda: self._open().poll(self.settings.worker.batch_rows, wait)
        )
        self._switch_champion()
        if not messages:
            return None
        self._follow_assignment()
        started = time.perf_counter()
        prepared = self._retrying("score", lambda: self.prepare(messages))
        stats = self._retrying("store", lambda: self.write(prepared))
        return self._committed(messages, stats, started)

    def _committed(self, messages: list[Message], stats: BatchStats, started: float) -> BatchStats:
        """Commit the offsets of stored messages and count them; then the online model may
        go to the registry. Returns the batch's stats timed from ``started``."""
        self._retrying("commit", lambda: self._open().commit(commit_map(messages)))
        if self._online_log is not None:
            self._online_log.maybe_log({f"{t}/{p}" for t, p in self._assignment})
        stats = _with_seconds(stats, time.perf_counter() - started)
        self.totals.add(stats)
        return stats

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T:
        return retrying(self.settings.worker.retry_for, what, call, self._count_retry)

    def _count_retry(self) -> None:
        self.retries += 1

    def run(
        self,
        until_idle: bool = False,
        stop: threading.Event | None = None,
        on_batch: Callable[[BatchStats, WorkerTotals], None] | None = None,
    ) -> WorkerTotals:
        """Process until ``stop`` is set, or until nothing is waiting with ``until_idle``.

        Pipelined: while micro-batch ``k`` is written (store, lake, topics) by
        a writer thread with its own connections (:class:`_Writer`), batch
        ``k + 1`` is polled and scored here; ``k``'s offsets are committed once its write
        returned, so the bus commit still follows the store, batch by batch
        and in order. Anything that makes the worker read back what it wrote
        (a new champion, a rebalance: both rebuild feature buffers from the
        store) first waits for the pending write. A store that other
        connections cannot see (SQLite ``:memory:``) runs one batch at a time.
        """
        stop = stop or threading.Event()
        report = on_batch or (lambda _stats, _totals: None)
        pipelined = ":memory:" not in self.settings.backends.store
        try:
            with cores_reserved(1 if pipelined else 0):  # the writer thread's core
                while not stop.is_set():
                    if not pipelined:
                        stats = self.step()
                        if stats is not None:
                            report(stats, self.totals)
                        elif until_idle:
                            break
                        continue
                    if not self._step_pipelined(report) and until_idle:
                        break
        finally:
            try:
                self._settle(report)
            finally:
                self.close()
        return self.totals

    def _step_pipelined(self, report: Callable[[BatchStats, WorkerTotals], None]) -> bool:
        """Poll and score one micro-batch and hand it to the writer; False when idle."""
        wait = self.settings.worker.poll_timeout
        messages = self._retrying(
            "poll", lambda: self._open().poll(self.settings.worker.batch_rows, wait)
        )
        if not messages or self._state_changes():
            self._settle(report)
        self._switch_champion()
        if not messages:
            return False
        self._follow_assignment()
        started = time.perf_counter()
        prepared = self._retrying("score", lambda: self.prepare(messages))
        self._settle(report)
        if self._writer is None:
            self._writer = _Writer(self.settings, self._count_retry)
        self._pending = (self._writer.submit(prepared), messages, started)
        return True

    def _state_changes(self) -> bool:
        """A champion switch or a rebalance is due (they read the store back)."""
        if self._watcher is not None and self._watcher.waiting:
            return True
        consumer = self._consumer
        return consumer is not None and frozenset(consumer.assignment()) != self._assignment

    def _settle(self, report: Callable[[BatchStats, WorkerTotals], None]) -> None:
        """Wait for the pending write, then commit its offsets (here: the consumer's thread)."""
        if self._pending is None:
            return
        future, messages, started = self._pending
        self._pending = None
        stats = self._committed(messages, future.result(), started)
        report(stats, self.totals)


def store_prepared(pipe: Pipeline, prepared: Prepared) -> BatchStats:
    """Store a prepared micro-batch with ``pipe``'s connections: one store transaction,
    then the lake and the topics."""
    started = time.perf_counter()
    store = pipe.store
    result = store.write(
        prepared.good, prepared.dead, prepared.lineage, prepared.origins, prepared.scored
    )
    new_rows = prepared.good.filter(pa.array(result.new_mask))
    pipe.lake.write(new_rows, result.batch_id)
    store.lake_done(result.batch_id)
    if prepared.dead.num_rows:
        pipe.producer.send(DEADLETTERS, prepared.dead)
    anomalies = 0
    if prepared.scored is not None:
        if prepared.scored.predictions.num_rows:
            pipe.producer.send(PREDICTIONS, prepared.scored.predictions)
        anomalies = int(np.count_nonzero(prepared.scored.scores.column("is_anomaly")))
    return BatchStats(
        rows=prepared.rows,
        stored=result.inserted,
        duplicates=prepared.duplicates + result.duplicates,
        deadletters=result.deadletters,
        seconds=time.perf_counter() - started,
        predictions=result.predictions,
        anomalies=anomalies,
        model=prepared.model,
    )


def retrying(
    retry_for: float, what: str, call: Callable[[], _T], on_retry: Callable[[], None] = lambda: None
) -> _T:
    """``call()``, retried with exponential backoff while it raises :class:`Unavailable`."""
    delay, waited = 0.1, 0.0
    while True:
        try:
            return call()
        except Unavailable as exc:
            if waited >= retry_for:
                raise
            pause = delay
            log.warning("%s unavailable (%s); retrying in %.1f s", what, exc, pause)
            on_retry()
            time.sleep(pause)
            waited += pause
            delay = min(delay * 2, 10.0)


class _Writer:
    """Writes prepared micro-batches in order, in one thread with its own connections.

    Its own :class:`Pipeline` because connections are not shared across
    threads (SQLite's are bound to theirs); they are opened and closed in
    the writer thread. The overlap comes from the time the database, the
    lake and the bus spend outside the GIL: large with PostgreSQL and Kafka,
    where a write waits on the network; with SQLite too, whose ``sqlite3_step``
    runs without the GIL. A writer *process* was tried twice and measured no
    faster: with ``multiprocessing`` (start-up and pickling ate the gain),
    then as a ``python -m`` child fed through ``/dev/shm`` (``meterops bench
    pipeline``, 480,000 readings: 30,567 and 29,055 readings/s against
    31,406 with this thread; the binding limit is the one SQLite writer's
    work, about 2.2 CPU-s per 100,000 readings, not the GIL).
    """

    def __init__(self, settings: Settings, on_retry: Callable[[], None]) -> None:
        self.settings = settings
        self.on_retry = on_retry
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meterops-writer")
        self._pipe: Pipeline | None = None

    def submit(self, prepared: Prepared) -> Future[BatchStats]:
        return self._pool.submit(self._write, prepared)

    def _write(self, prepared: Prepared) -> BatchStats:
        if self._pipe is None:
            self._pipe = Pipeline(self.settings)
        pipe = self._pipe
        retry_for = self.settings.worker.retry_for
        return retrying(retry_for, "store", lambda: store_prepared(pipe, prepared), self.on_retry)

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    def close(self) -> None:
        try:
            self._pool.submit(self._close_pipe).result()
        finally:
            self._pool.shutdown(wait=True)


def _with_seconds(stats: BatchStats, seconds: float) -> BatchStats:
    return dataclasses.replace(stats, seconds=seconds)


def commit_map(messages: Iterable[Message]) -> Mapping[tuple[str, int], int]:
    """Next offset per partition covered by ``messages``."""
    out: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic, m.partition)
        out[key] = max(out.get(key, 0), m.next_offset)
    return out
