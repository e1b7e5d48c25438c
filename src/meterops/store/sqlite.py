"""The embedded store: SQLite in WAL mode, safe with several processes.

Writes go through a temporary table: one ``executemany`` into an unkeyed temp
table (cheap), then set-based SQL finds duplicates and conflicts and moves the
new rows into the keyed ``readings`` table in key order, all inside one
``BEGIN IMMEDIATE`` transaction so concurrent workers serialise cleanly.
Timestamps are stored as integer microseconds since the epoch (UTC).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from meterops.errors import BackendError
from meterops.settings import Settings
from meterops.store._sql import (
    RESERVED,
    SQLITE,
    check_covariate,
    conflict_letters,
    migrations,
    now_us,
    statements,
)
from meterops.store.base import Store, StoreCounts, WriteResult
from meterops.types import DEADLETTER_SCHEMA, TS_TYPE, ReadingBatch, schema_for

__all__ = ["SQLiteStore", "build"]

MIGRATIONS: list[str] = migrations(SQLITE)


def build(url: str, settings: Settings) -> SQLiteStore:
    """Builder for ``sqlite:///path/to/file.db`` (resolved) or ``sqlite://:memory:``."""
    return SQLiteStore(url.partition("://")[2])


def _ts_us(column: pa.ChunkedArray | pa.Array) -> list[int]:
    return pc.cast(column, pa.int64()).to_pylist()  # type: ignore[no-any-return]


class SQLiteStore(Store):
    """See the module docstring. ``path`` may be ``:memory:`` for tests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._covariates: list[str] = []

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
        return self

    def close(self) -> None:
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
                    c.execute("DELETE FROM _in")
                inserted = int(new_mask.sum())
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
                c.execute("UPDATE batches SET inserted = ? WHERE id = ?", (inserted, batch_id))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite write failed: {exc}") from exc
        return WriteResult(batch_id, inserted, duplicates, written_dead, new_mask)

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
        columns = [
            range(len(good)),
            t.column("meter_id").to_pylist(),
            _ts_us(t.column("ts")),
            t.column("value").to_pylist(),
            *(t.column(x).to_pylist() for x in covs),
        ]
        marks = ", ".join("?" * len(columns))
        sql = f"INSERT INTO _in VALUES ({marks})"  # noqa: S608 - placeholders only
        c.executemany(sql, zip(*columns, strict=True))
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
        where: list[str] = ["1=1"]
        args: list[Any] = []
        if meter_id is not None:
            where.append("meter_id = ?")
            args.append(meter_id)
        if start is not None:
            where.append("ts >= ?")
            args.append(int(pd.Timestamp(start).value // 1000))
        if end is not None:
            where.append("ts < ?")
            args.append(int(pd.Timestamp(end).value // 1000))
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
        readings, meters, last = c.execute(
            "SELECT coalesce(sum(readings), 0), count(*), max(last_ts) FROM meters "
            "WHERE readings > 0"
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
        )

    def meters(self) -> pd.DataFrame:
        frame = pd.read_sql_query(
            "SELECT meter_id, first_ts, last_ts, readings, registered FROM meters "
            "ORDER BY meter_id",
            self.conn,
        )
        for col in ("first_ts", "last_ts"):
            frame[col] = pd.to_datetime(frame[col], unit="us", utc=True)
        frame["registered"] = frame["registered"].astype(bool)
        return frame

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
