"""The embedded store: SQLite in WAL mode, safe with several processes.

Writes go through a temporary table: the batch goes into an unkeyed temp
table (cheap), then set-based SQL finds duplicates and conflicts and moves the
new rows into the keyed ``readings`` table in key order, all inside one
``BEGIN IMMEDIATE`` transaction so concurrent workers serialise cleanly.
Timestamps are stored as integer microseconds since the epoch (UTC).

Rows go in as whole Arrow columns in one bound BLOB, read by the ``mo_columns``
virtual table in C (:mod:`meterops.store._native`; about 1 us per
prediction row instead of 4), or, where that module did not build or the URL
says ``?bind=rows``, value by value with ``executemany``: same rows, same SQL.

What the stream scored goes in the same transaction, in key order, straight
into the keyed tables (a temp table would only add a copy). Stored predictions
waiting for a new reading get their actual by one ``UPDATE``: the reading's
value goes to the primary keys ``(ts - lead, meter_id, horizon)``, one per
(horizon, lead) in ``prediction_leads`` (see :meth:`SQLiteStore._fill_actuals`).
New predictions get theirs as they are inserted, from the batch itself (an
Arrow join) or, for the few inside a meter's stored span, from one primary-key
lookup. A background thread copies the write-ahead log back into the database
file (see :class:`_Checkpointer`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from meterops.errors import BackendError, ConfigError
from meterops.settings import Settings
from meterops.store import _native
from meterops.store._sql import (
    NOTHING_INSERTED,
    NOTHING_SCORED,
    ONLINE_METRICS,
    PREDICTION_KEY,
    RESERVED,
    SQLITE,
    StreamReads,
    accuracy_frame,
    accuracy_sql,
    by_key,
    check_covariate,
    checkpoint_from,
    checkpoint_rows,
    conflict_letters,
    meter_tallies,
    migrations,
    now_us,
    prediction_leads,
    prediction_rows,
    range_filter,
    returned_keys,
    score_rows,
    span_table,
    statements,
    store_leads_sql,
)
from meterops.store.base import Checkpoint, Scored, Store, StoreCounts, WriteResult
from meterops.types import (
    DEADLETTER_SCHEMA,
    ONLINE_METRIC_SCHEMA,
    TS_TYPE,
    ReadingBatch,
    schema_for,
)

__all__ = ["FILL_ACTUALS", "SQLiteStore", "build"]

MIGRATIONS: list[str] = migrations(SQLITE)
_WAL_LIMIT = 16384  # pages (64 MiB of 4 KiB): the writer checkpoints beyond (_Checkpointer)

#: The waiting predictions' update (see :meth:`SQLiteStore._fill_actuals`), ``{waiting}``
#: the ``mo_columns`` table of ``ts, meter_id, horizon, value``.
FILL_ACTUALS = (
    "UPDATE predictions SET actual = w.c3 FROM {waiting}(?) AS w "
    "WHERE predictions.ts = w.c0 AND predictions.meter_id = w.c1 "
    "AND predictions.horizon = w.c2 AND predictions.actual IS NULL"
)
_CHECKPOINT_UPSERT = (
    "INSERT INTO checkpoints (name, state, offsets, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET state = excluded.state, offsets = excluded.offsets, "
    "updated_at = excluded.updated_at"
)


def build(url: str, settings: Settings) -> SQLiteStore:
    """Builder for ``sqlite:///path/to/file.db`` (resolved) or ``sqlite://:memory:``.

    ``?bind=rows`` binds written rows value by value even where
    :mod:`meterops.store._native` could bind whole columns (to compare the two).
    """
    path, _, query = url.partition("://")[2].partition("?")
    options = dict(part.partition("=")[::2] for part in query.split("&") if part)
    bind = options.pop("bind", "columns")
    if options or bind not in ("columns", "rows"):
        raise ConfigError(f"{url}: the only SQLite store option is bind=columns|rows")
    return SQLiteStore(path, bind_columns=bind == "columns")


def _pylist(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """Python values of an Arrow column (timestamps as integer microseconds), fast.

    NumPy's ``tolist`` makes Python numbers several times faster than Arrow's
    ``to_pylist``; it is used for floats (a null becomes NaN, which SQLite
    stores as NULL) and for other numbers without nulls.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_timestamp(column.type):
        column = pc.cast(column, pa.int64())
    kind = column.type
    if pa.types.is_floating(kind) or (
        column.null_count == 0 and (pa.types.is_integer(kind) or pa.types.is_boolean(kind))
    ):
        return column.to_numpy(zero_copy_only=False).tolist()  # type: ignore[no-any-return]
    return column.to_pylist()  # type: ignore[no-any-return]


def _rows(table: pa.Table) -> Iterator[tuple[Any, ...]]:
    """Rows of ``table`` as tuples (for ``executemany``)."""
    return zip(*(_pylist(column) for column in table.columns), strict=True)


def _waiting(fresh: pa.Table, leads: Sequence[tuple[int, int]]) -> pa.Table:
    """``ts, meter_id, horizon, value``: the key of every prediction each reading of
    ``fresh`` (with a value) may be the actual of, one per stored (horizon, lead)."""
    value = fresh.column("value")
    known = fresh.filter(pc.fill_null(pc.invert(pc.is_nan(value)), False))
    ts = pc.cast(known.column("ts"), pa.int64())
    n = known.num_rows
    parts = [
        pa.table(
            {
                "ts": pc.subtract(ts, lead),
                "meter_id": known.column("meter_id"),
                "horizon": pa.array(np.full(n, horizon, np.int64)),
                "value": known.column("value"),
            }
        )
        for horizon, lead in leads
    ]
    return by_key(pa.concat_tables(parts), PREDICTION_KEY)


def _marks(schema: pa.Schema) -> str:
    return ", ".join("?" * len(schema))


class _Checkpointer(threading.Thread):
    """Copies the write-ahead log back into the database file, off the writer's path.

    A scored batch spread over many meters dirties thousands of pages; copying
    them back (and syncing the file) inline took about a quarter of a write.
    The writer wakes this thread after each commit; SQLite runs its passive
    checkpoint concurrently with the next write (the GIL is released in SQLite
    calls). The writer's own automatic checkpoint stays as a bound, at
    ``_WAL_LIMIT`` pages, should this thread fall behind.
    """

    def __init__(self, path: str) -> None:
        super().__init__(name="meterops-sqlite-checkpoint", daemon=True)
        self.path = path
        self._wake = threading.Event()
        self._stopping = False

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error:  # the writer checkpoints itself, at _WAL_LIMIT
            return
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                with contextlib.suppress(sqlite3.Error):  # busy: the next wake retries
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self.join()


class _Overlap(Exception):
    """Scored rows of a write were stored already: redo the write carefully."""


class SQLiteStore(StreamReads, Store):
    """See the module docstring. ``path`` may be ``:memory:`` for tests."""

    def __init__(self, path: str, bind_columns: bool = True) -> None:
        self.path = path
        self.bind_columns = bind_columns and _native.AVAILABLE
        self._conn: sqlite3.Connection | None = None
        self._covariates: list[str] = []
        self._checkpointer: _Checkpointer | None = None

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> SQLiteStore:
        if self._conn is not None:
            return self
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA cache_size=-262144")
            conn.execute("PRAGMA busy_timeout=60000")
            self._conn = conn
            self._migrate()
            self._covariates = self._read_covariates()
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open SQLite store {self.path}: {exc}") from exc
        if self.path != ":memory:":
            conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_LIMIT}")
            self._checkpointer = _Checkpointer(self.path)
            self._checkpointer.start()
        return self

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BackendError("the store is not open: call open() first")
        return self._conn

    def _migrate(self) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = c.execute("SELECT max(version) FROM schema_version").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            for version, sql in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in statements(sql):
                    c.execute(statement)
                c.execute("INSERT INTO schema_version VALUES (?)", (version,))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _read_covariates(self) -> list[str]:
        cols = [r[1] for r in self.conn.execute("PRAGMA table_info(readings)")]
        return [c for c in cols if c not in RESERVED]

    def _ensure_covariates(self, names: Sequence[str]) -> None:
        """Add a REAL column per new covariate (inside the caller's transaction)."""
        missing = [n for n in names if n not in self._covariates]
        if not missing:
            return
        self._covariates = self._read_covariates()
        for name in missing:
            if name in self._covariates:
                continue
            check_covariate(name)
            self.conn.execute(f'ALTER TABLE readings ADD COLUMN "{name}" REAL')
            self._covariates.append(name)

    # -- writes ------------------------------------------------------------
    def write(
        self,
        good: ReadingBatch,
        dead: pa.Table,
        lineage: Mapping[str, Any],
        origins: pa.Table | None = None,
        scored: Scored | None = None,
    ) -> WriteResult:
        try:
            result = self._write(good, dead, lineage, origins, scored, careful=False)
        except _Overlap:  # rolled back: redo, learning which scored rows are new
            result = self._write(good, dead, lineage, origins, scored, careful=True)
        if self._checkpointer is not None:
            self._checkpointer.poke()
        return result

    def _write(
        self,
        good: ReadingBatch,
        dead: pa.Table,
        lineage: Mapping[str, Any],
        origins: pa.Table | None,
        scored: Scored | None,
        careful: bool,
    ) -> WriteResult:
        c = self.conn
        covs = list(good.covariates)
        n = len(good)
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                self._ensure_covariates(covs)
                cur = c.execute(
                    "INSERT INTO batches (created_at, lineage, inserted, lake_pending) "
                    "VALUES (?, ?, 0, 1)",
                    (now_us(), json.dumps(lineage)),
                )
                batch_id = int(cur.lastrowid or 0)
                new_mask = np.ones(n, dtype=bool)
                duplicates = 0
                conflicts: list[int] = []
                if n:
                    existing = self._stage(good, covs)
                    if existing:
                        idx = np.array([e[0] for e in existing], dtype=np.int64)
                        same = np.array([bool(e[1]) for e in existing])
                        new_mask[idx] = False
                        duplicates = int(same.sum())
                        conflicts = idx[~same].tolist()
                        c.executemany("DELETE FROM _in WHERE i = ?", [(int(i),) for i in idx])
                    cols = ", ".join(["meter_id", "ts", "value", *(f'"{x}"' for x in covs)])
                    c.execute(
                        f"INSERT INTO readings ({cols}, batch) SELECT {cols}, ? FROM _in "  # noqa: S608
                        "ORDER BY meter_id, ts ON CONFLICT DO NOTHING",
                        (batch_id,),
                    )
                    c.execute(
                        "INSERT INTO meters (meter_id, first_ts, last_ts, readings) "
                        "SELECT meter_id, min(ts), max(ts), count(*) FROM _in GROUP BY meter_id "
                        "ON CONFLICT (meter_id) DO UPDATE SET "
                        "first_ts = min(coalesce(first_ts, excluded.first_ts), excluded.first_ts), "
                        "last_ts = max(coalesce(last_ts, excluded.last_ts), excluded.last_ts), "
                        "readings = readings + excluded.readings"
                    )
                inserted = int(new_mask.sum())
                tally = self._write_scored(scored or NOTHING_SCORED, good, new_mask, careful)
                if n:
                    c.execute("DELETE FROM _in")
                dead_rows = self._deadletter_rows(dead)
                if conflicts:
                    dead_rows += self._deadletter_rows(conflict_letters(good, conflicts, origins))
                before = c.total_changes
                c.executemany(
                    'INSERT OR IGNORE INTO deadletters (source, "offset", meter_id, ts, value, '
                    "reason, raw, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    dead_rows,
                )
                written_dead = c.total_changes - before
                predictions, _, scores, actuals = tally
                c.execute("UPDATE batches SET inserted = ? WHERE id = ?", (inserted, batch_id))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                self._covariates = self._read_covariates()  # an ALTER may be undone
                raise
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite write failed: {exc}") from exc
        return WriteResult(
            batch_id,
            inserted,
            duplicates,
            written_dead,
            new_mask,
            predictions=predictions,
            scores=scores,
            actuals=actuals,
        )

    def _changes(self, sql: str, args: Sequence[Any] = ()) -> int:
        c = self.conn
        before = c.total_changes
        c.execute(sql, args)
        return c.total_changes - before

    def _write_scored(
        self, scored: Scored, good: ReadingBatch, new_mask: np.ndarray, careful: bool
    ) -> tuple[int, int, int, int]:
        """Store ``scored`` inside the caller's transaction, after the readings.

        ``_in`` holds exactly the readings this write inserted (the rows of
        ``good`` under ``new_mask``). Returns (predictions, anomalies, scores,
        actuals) inserted or filled. See :meth:`_insert_new` for ``careful``.
        """
        c = self.conn
        actuals = 0
        fresh = good.table.filter(new_mask) if len(good) else None
        if fresh is not None and fresh.num_rows and self._any_predictions():
            # (b) stored predictions waiting for a reading this write inserted; before
            # this batch's predictions go in, which get their actual as they do
            leads = c.execute("SELECT horizon, lead FROM prediction_leads").fetchall()
            if leads:
                actuals += self._fill_actuals(_waiting(fresh, leads))
        made = seen = NOTHING_INSERTED
        if scored.predictions.num_rows:
            rows = prediction_rows(scored.predictions, fresh, self._spans, self._stored)
            new = self._insert_new("predictions", rows, "actual", careful)
            c.executemany(store_leads_sql("?"), prediction_leads(rows))
            made = pa.table({"meter_id": new.column(0), "flag": pc.is_valid(new.column(1))})
            actuals += int(pc.sum(made.column("flag")).as_py() or 0)
        if scored.scores.num_rows:
            new = self._insert_new("scores", score_rows(scored.scores), "is_anomaly", careful)
            seen = new.rename_columns(["meter_id", "flag"])
        ids, predictions, anomalies = meter_tallies(made, seen)
        if ids:
            c.executemany(
                "INSERT INTO meters (meter_id, predictions, anomalies) VALUES (?, ?, ?) "
                "ON CONFLICT (meter_id) DO UPDATE SET "
                "predictions = predictions + excluded.predictions, "
                "anomalies = anomalies + excluded.anomalies",
                zip(ids, predictions, anomalies, strict=True),
            )
        if scored.online_metrics.num_rows:
            c.executemany(
                f"INSERT INTO online_metrics ({ONLINE_METRICS}) "  # noqa: S608
                f"VALUES ({_marks(ONLINE_METRIC_SCHEMA)}) ON CONFLICT DO NOTHING",
                _rows(scored.online_metrics.select(ONLINE_METRIC_SCHEMA.names)),
            )
        if scored.checkpoints:
            c.executemany(_CHECKPOINT_UPSERT, checkpoint_rows(scored.checkpoints))
        return made.num_rows, sum(anomalies), seen.num_rows, actuals

    def _bulk(self, head: str, rows: pa.Table, tail: str = "") -> None:
        """Run ``{head} <rows> {tail}``: ``head`` an ``INSERT INTO``, ``tail`` a conflict clause.

        With :mod:`._native` loaded the rows go as one BLOB of whole columns,
        else value by value (``executemany``).
        """
        c = self.conn
        if not self.bind_columns:
            c.executemany(f"{head} VALUES ({_marks(rows.schema)}) {tail}", _rows(rows))
            return
        c.execute(
            f"{head} SELECT * FROM {self._columns(rows)}(?) WHERE true {tail}",  # noqa: S608
            (_native.pack(rows),),
        )

    def _columns(self, rows: pa.Table) -> str:
        """The ``mo_columns`` table that reads batches shaped as ``rows``.

        Created in every call: a rolled-back transaction takes it away.
        """
        columns = rows.num_columns
        self.conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{_native.table_sql(columns)}")
        return f"temp.{_native.table_name(columns)}"

    def _fill_actuals(self, waiting: pa.Table) -> int:
        """Set ``actual`` of the stored predictions keyed as in ``waiting`` (see
        :func:`_waiting`) that have none; returns how many were set.

        Each is one primary-key lookup: the batch's keys drive the loop (the
        virtual table cannot be searched, so SQLite scans it and searches
        ``predictions``; row by row, each ``UPDATE`` names the whole key).
        """
        if not self.bind_columns:
            before = self.conn.total_changes
            self.conn.executemany(
                "UPDATE predictions SET actual = ? "
                "WHERE ts = ? AND meter_id = ? AND horizon = ? AND actual IS NULL",
                _rows(waiting.select(["value", "ts", "meter_id", "horizon"])),
            )
            return self.conn.total_changes - before
        sql = FILL_ACTUALS.format(waiting=self._columns(waiting))
        return self._changes(sql, (_native.pack(waiting),))

    def _any_predictions(self) -> bool:
        return bool(self.conn.execute("SELECT EXISTS (SELECT 1 FROM predictions)").fetchone()[0])

    def _insert_new(self, table: str, rows: pa.Table, column: str, careful: bool) -> pa.Table:
        """Insert the rows (in key order) whose key is not stored; return the ``meter_id``
        and ``column`` of those inserted.

        The common case, none of them stored, is one ``executemany`` straight
        into the keyed table, and the answer is ``rows`` itself. If some were
        stored (a redelivery) it raises :class:`_Overlap`, and the write is redone
        ``careful``: through a temp table and ``INSERT ... RETURNING``, which
        says which rows went in. (A savepoint would spare the redo but costs
        every write about 15 %.)
        """
        c = self.conn
        columns = ", ".join(f'"{name}"' for name in rows.column_names)
        if not careful:
            before = c.total_changes
            self._bulk(f"INSERT INTO {table} ({columns})", rows, "ON CONFLICT DO NOTHING")
            if c.total_changes - before != rows.num_rows:
                raise _Overlap
            return rows.select(["meter_id", column])
        c.execute("DROP TABLE IF EXISTS temp._new")
        c.execute(f"CREATE TEMP TABLE _new ({columns})")
        self._bulk("INSERT INTO _new", rows)
        # (RETURNING gives plain columns: SQLite 3.40 answers `x IS NOT NULL` wrongly there)
        found = c.execute(
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _new "  # noqa: S608
            f'ORDER BY rowid ON CONFLICT DO NOTHING RETURNING meter_id, "{column}"'
        ).fetchall()
        c.execute("DROP TABLE temp._new")
        return returned_keys(found, column, rows.schema.field(column).type)

    def _spans(self, meter_ids: list[str]) -> pa.Table:
        """``meter_id, first_ts, last_ts`` of the stored meters among ``meter_ids``."""
        found = self.conn.execute(
            "SELECT meter_id, first_ts, last_ts FROM meters "
            "WHERE meter_id IN (SELECT value FROM json_each(?)) AND last_ts IS NOT NULL",
            (json.dumps(meter_ids),),
        ).fetchall()
        return span_table(found)

    def _stored(self, rows: pa.Table) -> np.ndarray:
        """The stored reading value at each row's (meter_id, target_ts), NaN if none."""
        c = self.conn
        c.execute("DROP TABLE IF EXISTS temp._q")
        c.execute("CREATE TEMP TABLE _q (i INTEGER PRIMARY KEY, meter_id TEXT, ts INTEGER)")
        self._bulk(
            "INSERT INTO _q",
            pa.table(
                [np.arange(rows.num_rows), rows.column("meter_id"), rows.column("target_ts")],
                names=["i", "meter_id", "ts"],
            ),
        )
        values = np.full(rows.num_rows, np.nan)
        for i, value in c.execute(
            "SELECT _q.i, r.value FROM _q JOIN readings r ON r.meter_id = _q.meter_id "
            "AND r.ts = _q.ts WHERE r.value IS NOT NULL"
        ):
            values[i] = value
        c.execute("DROP TABLE temp._q")
        return values

    def _stage(self, good: ReadingBatch, covs: list[str]) -> list[tuple[int, int]]:
        """Load ``good`` into the temp table; return (row, same value?) of stored keys."""
        c = self.conn
        cov_defs = "".join(f', "{x}" REAL' for x in covs)
        c.execute("DROP TABLE IF EXISTS temp._in")
        c.execute(
            "CREATE TEMP TABLE _in (i INTEGER PRIMARY KEY, meter_id TEXT, ts INTEGER, "
            f"value REAL{cov_defs})"
        )
        t = good.table
        names = ["meter_id", "ts", "value", *covs]
        self._bulk(
            "INSERT INTO _in",
            pa.table([np.arange(len(good)), *t.select(names).columns], ["i", *names]),
        )
        rows = c.execute(
            "SELECT _in.i, r.value IS _in.value FROM _in "
            "JOIN readings r ON r.meter_id = _in.meter_id AND r.ts = _in.ts"
        ).fetchall()
        return [(int(i), int(s)) for i, s in rows]

    @staticmethod
    def _deadletter_rows(dead: pa.Table) -> list[tuple[Any, ...]]:
        if dead.num_rows == 0:
            return []
        now = now_us()
        cols = [dead.column(f.name).to_pylist() for f in DEADLETTER_SCHEMA]
        return [(*row, now) for row in zip(*cols, strict=True)]

    # -- reads -------------------------------------------------------------
    def readings(
        self,
        meter_id: str | None = None,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> ReadingBatch:
        where, args = range_filter("?", meter_id, start, end)
        return self._select(" AND ".join(where), args)

    def _select(self, where: str, args: Sequence[Any]) -> ReadingBatch:
        covs = self._read_covariates()
        cols = ", ".join(["meter_id", "ts", "value", *(f'"{x}"' for x in covs)])
        rows = self.conn.execute(
            f"SELECT {cols} FROM readings WHERE {where} ORDER BY meter_id, ts",  # noqa: S608
            args,
        ).fetchall()
        if not rows:
            return ReadingBatch.empty(covs)
        columns = list(zip(*rows, strict=True))
        schema = schema_for(covs)
        arrays = [
            pa.array(columns[0], pa.string()),
            pa.array(np.asarray(columns[1], dtype=np.int64), pa.int64()).cast(TS_TYPE),
            *(pa.array(col, pa.float64()) for col in columns[2:]),
        ]
        return ReadingBatch(pa.Table.from_arrays(arrays, schema=schema))

    def deadletters(
        self, reason: str | None = None, limit: int | None = None, replayed: bool = False
    ) -> pd.DataFrame:
        where: list[str] = ["1=1"]
        args: list[Any] = []
        if reason is not None:
            where.append("reason = ?")
            args.append(reason)
        if not replayed:
            where.append("replayed_at IS NULL")
        clauses = " AND ".join(where)  # fixed clauses; values are bound parameters
        sql = (
            'SELECT id, source, "offset", meter_id, ts, value, reason, raw, received_at, '  # noqa: S608
            f"replayed_at FROM deadletters WHERE {clauses} ORDER BY id DESC"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        frame = pd.read_sql_query(sql, self.conn, params=args)
        for col in ("received_at", "replayed_at"):
            frame[col] = pd.to_datetime(frame[col], unit="us", utc=True)
        return frame

    def mark_replayed(self, ids: Sequence[int]) -> int:
        now = now_us()
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        before = c.total_changes
        c.executemany(
            "UPDATE deadletters SET replayed_at = ? WHERE id = ? AND replayed_at IS NULL",
            [(now, int(i)) for i in ids],
        )
        changed = c.total_changes - before
        c.execute("COMMIT")
        return changed

    def counts(self) -> StoreCounts:
        c = self.conn
        readings, meters, last, predictions, anomalies = c.execute(
            "SELECT coalesce(sum(readings), 0), coalesce(sum(readings > 0), 0), max(last_ts), "
            "coalesce(sum(predictions), 0), coalesce(sum(anomalies), 0) FROM meters"
        ).fetchone()
        by_reason = dict(
            c.execute("SELECT reason, count(*) FROM deadletters GROUP BY reason").fetchall()
        )
        return StoreCounts(
            readings=int(readings),
            meters=int(meters),
            deadletters=int(sum(by_reason.values())),
            deadletters_by_reason={str(k): int(v) for k, v in by_reason.items()},
            last_ts=None if last is None else pd.Timestamp(int(last), unit="us", tz="UTC"),
            predictions=int(predictions),
            anomalies=int(anomalies),
        )

    def meters(self) -> pd.DataFrame:
        frame = pd.read_sql_query(
            "SELECT meter_id, first_ts, last_ts, readings, registered, cluster FROM meters "
            "ORDER BY meter_id",
            self.conn,
        )
        for col in ("first_ts", "last_ts"):
            frame[col] = pd.to_datetime(frame[col], unit="us", utc=True)
        frame["readings"] = frame["readings"].astype(np.int64)
        frame["registered"] = frame["registered"].astype(bool)
        frame["cluster"] = frame["cluster"].astype("Int64")
        return frame

    def set_clusters(self, clusters: Mapping[str, int]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(
                "INSERT INTO meters (meter_id, cluster) VALUES (?, ?) "
                "ON CONFLICT (meter_id) DO UPDATE SET cluster = excluded.cluster",
                sorted((str(m), int(k)) for m, k in clusters.items()),
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    # -- scored ------------------------------------------------------------
    def _frame(self, sql: str, args: Sequence[Any], columns: list[str]) -> pd.DataFrame:
        frame = pd.read_sql_query(sql, self.conn, params=list(args))
        frame.columns = columns
        return frame

    def accuracy(self, since: pd.Timestamp | None = None, by_meter: bool = True) -> pd.DataFrame:
        args = [] if since is None else [int(pd.Timestamp(since).value // 1000)]
        rows = self.conn.execute(accuracy_sql(by_meter, since is not None, "?"), args).fetchall()
        return accuracy_frame(rows, by_meter)

    def checkpoint(self, name: str) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT state, offsets FROM checkpoints WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else checkpoint_from(name, row[0], row[1])

    def register_meters(self, meter_ids: Sequence[str]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        c.executemany(
            "INSERT INTO meters (meter_id, registered) VALUES (?, 1) "
            "ON CONFLICT (meter_id) DO UPDATE SET registered = 1",
            [(m,) for m in meter_ids],
        )
        c.execute("COMMIT")

    def registered_meters(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT meter_id FROM meters WHERE registered = 1")}

    # -- lake outbox ---------------------------------------------------------
    def pending_lake_batches(self) -> list[int]:
        rows = self.conn.execute("SELECT id FROM batches WHERE lake_pending = 1 ORDER BY id")
        return [int(r[0]) for r in rows]

    def batch_readings(self, batch_id: int) -> ReadingBatch:
        return self._select("batch = ?", [int(batch_id)])

    def lake_done(self, batch_id: int) -> None:
        self.conn.execute("UPDATE batches SET lake_pending = 0 WHERE id = ?", (int(batch_id),))
