"""The scale-out store: PostgreSQL through psycopg 3, a connection pool and bulk COPY.

Same schema and semantics as the SQLite store (``_sql.py`` holds the shared
migrations). A ``write`` is one transaction:

1. new covariate columns are added under a transaction-level advisory lock
   (the only place writers serialise; ordinary writes never wait for each other
   unless they touch the same keys, and rows go in key order so two that do
   lock them in the same order);
2. the batch, sorted by key, is sent with one binary ``COPY`` (encoded by
   :func:`copy_binary` straight from the Arrow buffers with NumPy) directly
   into ``readings`` inside a savepoint, and the per-meter summary (computed
   with Arrow) is upserted into ``meters``: the common case of new readings
   costs no more than a bare ``COPY`` into the keyed table;
3. if a key is already stored, the ``COPY`` fails on the primary key, the
   savepoint is rolled back, and the batch goes the careful way: one ``COPY``
   into a temporary table dropped at commit, one statement that inserts in
   key order with ``ON CONFLICT DO NOTHING`` and upserts the meters from the
   rows it actually inserted, then an index lookup that sorts the rest into
   duplicates (same value) and conflicts (dead letters keyed by origin);
4. dead letters go in with one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT
   (source, "offset") DO NOTHING``, and the batch is recorded for the lake;
5. what the stream scored follows the same pattern: predictions (with the
   actuals already known, found by an Arrow join with the new readings) and
   scores are each one binary ``COPY`` straight into their keyed table in a
   savepoint, or on a stored key (a redelivery) a ``COPY`` into a temp table
   and ``INSERT ... ON CONFLICT DO NOTHING``; stored predictions waiting for
   the new readings get their actual by one ``UPDATE`` joined by index with
   the new readings (``COPY``-ed to a temp table: binding arrays costs more).
   ``predictions`` keeps 30 % free room per page so that update stays on its
   page ("HOT") without new index entries.

Timestamps are ``int8`` microseconds since the Unix epoch (UTC), as in SQLite:
the binary ``COPY`` takes Arrow's int64 buffer as it is and reads parse plain
integers; ``to_timestamp(ts / 1e6)`` gives a ``timestamptz`` for ad-hoc SQL.
Reads use ``COPY (SELECT ...) TO STDOUT`` parsed by Arrow's CSV reader.

URL: ``postgresql://user@host:port/db`` (or ``postgres://``) with optional
pool options ``pool_min``, ``pool_max`` and ``pool_timeout`` (seconds a call
waits for a connection before raising :class:`~meterops.errors.Unavailable`)
in the query string; other query options go to libpq (e.g. ``sslmode``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from meterops.errors import BackendError, ConfigError, MissingDependency, Unavailable
from meterops.settings import Settings
from meterops.store._sql import (
    NOTHING_INSERTED,
    NOTHING_SCORED,
    ONLINE_METRICS,
    POSTGRES,
    PREDICTION_KEY,
    RESERVED,
    SCORE_KEY,
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
    KEY_COLUMNS,
    ONLINE_METRIC_SCHEMA,
    TS_TYPE,
    ReadingBatch,
    schema_for,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = [
    "BY_INDEX",
    "FILL_ACTUALS",
    "MIGRATIONS",
    "STORED_VALUES",
    "PostgresStore",
    "build",
    "copy_binary",
]

MIGRATIONS: list[str] = migrations(POSTGRES)

_CHECKPOINT_UPSERT = (
    "INSERT INTO checkpoints (name, state, offsets, updated_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (name) DO UPDATE SET state = excluded.state, offsets = excluded.offsets, "
    "updated_at = excluded.updated_at"
)

# Keys of the transaction-level advisory locks (per database).
_MIGRATION_LOCK = 0x6D6574_0001
_SCHEMA_LOCK = 0x6D6574_0002

# Fold a batch's per-meter summary into ``meters`` (aliased ``m``).
_METERS_UPSERT = (
    "ON CONFLICT (meter_id) DO UPDATE SET "
    "first_ts = least(m.first_ts, excluded.first_ts), "
    "last_ts = greatest(m.last_ts, excluded.last_ts), "
    "readings = m.readings + excluded.readings"
)
_METERS_FROM_ARRAYS = (
    "INSERT INTO meters AS m (meter_id, first_ts, last_ts, readings) "  # noqa: S608 - constant
    "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[]) ORDER BY 1 "
    + _METERS_UPSERT
)

# The actual-joins, run under ``BY_INDEX`` (so by index, row by row):
# stored predictions waiting for the new readings staged in ``_r``, and the
# stored readings for the predictions staged in ``_q``.
BY_INDEX = (
    "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "
    "SET LOCAL enable_seqscan = off"
)
FILL_ACTUALS = (
    "WITH w AS MATERIALIZED (SELECT r.ts - l.lead AS ts, r.meter_id, l.horizon, r.value "
    "FROM _r r CROSS JOIN prediction_leads l WHERE r.value IS NOT NULL) "
    "UPDATE predictions p SET actual = w.value FROM w "
    "WHERE p.ts = w.ts AND p.meter_id = w.meter_id AND p.horizon = w.horizon "
    "AND p.actual IS NULL"
)
STORED_VALUES = (
    "SELECT q.i, r.value FROM _q q JOIN readings r ON r.meter_id = q.meter_id AND r.ts = q.ts "
    "WHERE r.value IS NOT NULL"
)

_POOL_OPTIONS = {"pool_min": int, "pool_max": int, "pool_timeout": float}
_RETRY_AFTER = 2.0


def build(url: str, settings: Settings) -> PostgresStore:
    """Builder for ``postgresql://`` and ``postgres://`` URLs (see the module docstring)."""
    return PostgresStore(url)


# -- binary COPY encoding ----------------------------------------------------
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, extension length
_COPY_TRAILER = b"\xff\xff"


def _put(buf: np.ndarray, at: np.ndarray, data: np.ndarray) -> None:
    """Write row ``k`` of ``data`` (uint8, shape (n, width)) at ``buf[at[k]:]``."""
    if len(at):
        buf[at[:, None] + np.arange(data.shape[1])] = data


def copy_binary(columns: Sequence[pa.Array | pa.ChunkedArray]) -> bytes:
    """Encode equal-length Arrow columns as one PostgreSQL binary ``COPY`` stream.

    Strings become ``text``, integers, booleans and timestamps ``int8`` (the
    timestamp's integer value, 0/1), floats ``float8``; nulls become SQL NULL.
    Vectorised with NumPy: no Python call per row.

    >>> data = copy_binary([pa.array(["a"]), pa.array([1]), pa.array([None], pa.float64())])
    >>> data[19:]
    b'\\x00\\x03\\x00\\x00\\x00\\x01a\\x00\\x00\\x00\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01\\xff\\xff\\xff\\xff\\xff\\xff'
    """
    arrays = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns]
    n = len(arrays[0]) if arrays else 0
    row_size = np.full(n, 2, dtype=np.int64)
    fields: list[tuple[np.ndarray, Any]] = []  # (lengths with -1 for null, payload)
    for arr in arrays:
        kind = arr.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            valid = None
            if arr.null_count:
                valid = arr.is_valid().to_numpy(zero_copy_only=False)
                arr = arr.fill_null("")  # nulls become empty slots, sent as SQL NULL below
            width = np.int64 if pa.types.is_large_string(kind) else np.int32
            _, offsets_buf, data_buf = arr.buffers()
            offsets = np.frombuffer(offsets_buf, dtype=width)[arr.offset : arr.offset + n + 1]
            offsets = offsets.astype(np.int64)
            data = (
                np.frombuffer(data_buf, dtype=np.uint8)
                if data_buf is not None
                else np.zeros(0, np.uint8)
            )
            lengths = np.diff(offsets)
            row_size += 4 + lengths
            if valid is not None:
                lengths = np.where(valid, lengths, -1)
            fields.append((lengths, (offsets, data)))
            continue
        if pa.types.is_boolean(kind):
            arr = pc.cast(arr, pa.int64())
            kind = arr.type
        if pa.types.is_timestamp(kind) or pa.types.is_integer(kind):
            values = pc.cast(arr, pa.int64()).fill_null(0).to_numpy().astype(">i8")
        elif pa.types.is_floating(kind):
            values = pc.cast(arr, pa.float64()).fill_null(0.0).to_numpy().astype(">f8")
        else:
            raise TypeError(f"cannot COPY an Arrow column of type {kind}")
        if arr.null_count:
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            lengths = np.where(valid, 8, -1).astype(np.int64)
        else:
            lengths = np.full(n, 8, dtype=np.int64)
        fields.append((lengths, values.view(np.uint8).reshape(n, 8)))
        row_size += 4 + np.maximum(lengths, 0)
    head = len(_COPY_HEADER)
    starts = head + np.concatenate(([0], np.cumsum(row_size)[:-1])).astype(np.int64)
    total = head + int(row_size.sum()) + len(_COPY_TRAILER)
    buf = np.empty(total, dtype=np.uint8)
    buf[:head] = np.frombuffer(_COPY_HEADER, dtype=np.uint8)
    buf[total - len(_COPY_TRAILER) :] = np.frombuffer(_COPY_TRAILER, dtype=np.uint8)
    counts = np.full(n, len(fields), dtype=">i2").view(np.uint8).reshape(n, 2)
    _put(buf, starts, counts)
    pos = starts + 2
    for lengths, payload in fields:
        _put(buf, pos, lengths.astype(">i4").view(np.uint8).reshape(n, 4))
        pos = pos + 4
        if isinstance(payload, tuple):  # text
            offsets, data = payload
            first, last = int(offsets[0]), int(offsets[-1])
            sizes = np.maximum(lengths, 0)
            if last > first:
                shift = np.repeat(pos - (offsets[:-1] - first), sizes)
                buf[np.arange(last - first, dtype=np.int64) + shift] = data[first:last]
            pos = pos + sizes
        else:
            valid = lengths > 0
            if valid.all():
                _put(buf, pos, payload)
            else:
                _put(buf, pos[valid], payload[valid])
            pos = pos + np.maximum(lengths, 0)
    return buf.tobytes()


def _split_url(url: str) -> tuple[str, dict[str, Any]]:
    """Separate the pool options from the libpq connection URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"not a PostgreSQL URL: {url!r}")
    libpq: list[tuple[str, str]] = []
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query):
        if key in _POOL_OPTIONS:
            try:
                options[key] = _POOL_OPTIONS[key](value)
            except ValueError as exc:
                raise ConfigError(f"store URL option {key}={value!r} is not a number") from exc
        else:
            libpq.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(libpq))), options


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _quoted(names: Sequence[str]) -> str:
    return "".join(f', "{check_covariate(x)}"' for x in names)


def _scalar(conn: psycopg.Connection[tuple[Any, ...]], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    return row[0] if row else None


def _column_defs(schema: pa.Schema) -> str:
    """Temp-table columns matching what :func:`copy_binary` sends for ``schema``."""

    def sql_type(kind: pa.DataType) -> str:
        if pa.types.is_string(kind):
            return 'TEXT COLLATE "C"'
        if pa.types.is_floating(kind):
            return "DOUBLE PRECISION"
        return "BIGINT"  # integers, timestamps, booleans

    return ", ".join(f'"{f.name}" {sql_type(f.type)}' for f in schema)


def _copy_into(conn: psycopg.Connection[tuple[Any, ...]], table: str, rows: pa.Table) -> bool:
    """COPY ``rows`` (columns named as in ``table``) straight into ``table``; False if a key
    is stored already (the savepoint undoes the partial COPY)."""
    import psycopg

    columns = ", ".join(f'"{name}"' for name in rows.column_names)
    payload = copy_binary(rows.columns)
    try:
        with (
            conn.transaction(),
            conn.cursor() as cur,
            cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT binary)") as copy,
        ):
            copy.write(payload)
    except psycopg.errors.UniqueViolation:
        return False
    return True


def _stage(conn: psycopg.Connection[tuple[Any, ...]], name: str, rows: pa.Table) -> None:
    """COPY ``rows`` into a new temp table ``name`` (dropped at commit)."""
    conn.execute(f"CREATE TEMP TABLE {name} ({_column_defs(rows.schema)}) ON COMMIT DROP")
    with conn.cursor() as cur, cur.copy(f"COPY {name} FROM STDIN (FORMAT binary)") as copy:
        copy.write(copy_binary(rows.columns))


def _insert_new(
    conn: psycopg.Connection[tuple[Any, ...]],
    table: str,
    rows: pa.Table,
    column: str,
    key: Sequence[str],
) -> pa.Table:
    """Insert the rows (in key order) whose key is not stored; return the ``meter_id``
    and ``column`` of those inserted.

    The common case, none of them stored, is one binary ``COPY`` straight into
    the keyed table, and the answer is ``rows`` itself; if some were stored (a
    redelivery), a ``COPY`` into a temp table and ``INSERT ... ON CONFLICT DO
    NOTHING RETURNING`` say which went in.
    """
    if _copy_into(conn, table, rows):
        return rows.select(["meter_id", column])
    _stage(conn, "_new", rows)
    columns = ", ".join(f'"{name}"' for name in rows.column_names)
    found = conn.execute(
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _new "  # noqa: S608
        f'ORDER BY {", ".join(key)} ON CONFLICT DO NOTHING RETURNING meter_id, "{column}"'
    ).fetchall()
    conn.execute("DROP TABLE _new")
    return returned_keys(found, column, rows.schema.field(column).type)


def _spans(conn: psycopg.Connection[tuple[Any, ...]], meter_ids: list[str]) -> pa.Table:
    """``meter_id, first_ts, last_ts`` of the stored meters among ``meter_ids``."""
    found = conn.execute(
        "SELECT meter_id, first_ts, last_ts FROM meters "
        "WHERE meter_id = ANY(%s::text[]) AND last_ts IS NOT NULL",
        (meter_ids,),
    ).fetchall()
    return span_table(found)


def _stored_values(conn: psycopg.Connection[tuple[Any, ...]], rows: pa.Table) -> np.ndarray:
    """The stored reading value at each row's (meter_id, target_ts), NaN if none."""
    keys = pa.table(
        {
            "i": pa.array(np.arange(rows.num_rows, dtype=np.int64)),
            "meter_id": rows.column("meter_id"),
            "ts": rows.column("target_ts"),
        }
    )
    _stage(conn, "_q", keys)
    values = np.full(rows.num_rows, np.nan)
    found = conn.execute(STORED_VALUES).fetchall()
    conn.execute("DROP TABLE _q")
    for i, value in found:
        values[i] = value
    return values


class PostgresStore(StreamReads, Store):
    """See the module docstring."""

    param = "%s"

    def __init__(self, url: str) -> None:
        self.url = url
        self._conninfo, options = _split_url(url)
        self._where = _redacted(url)
        self.pool_min = int(options.get("pool_min", 1))
        self.pool_max = int(options.get("pool_max", 4))
        self.pool_timeout = float(options.get("pool_timeout", 10.0))
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] | None = None
        self._covariates: list[str] = []
        self._lost = False  # the server went away: replace the pool on the next call
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> PostgresStore:
        if self._pool is not None:
            return self
        self._pool = self._new_pool()
        try:
            self._migrate()
        except BaseException:
            self.close()
            raise
        return self

    def _new_pool(self) -> ConnectionPool[psycopg.Connection[tuple[Any, ...]]]:
        """An open pool with ``pool_min`` live connections, or :class:`Unavailable`."""
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise MissingDependency("psycopg", "postgres") from exc
        try:
            # One direct connection first: fails fast and says why (refused,
            # unknown database, auth), where the pool would only time out.
            psycopg.connect(
                self._conninfo, connect_timeout=max(1, round(self.pool_timeout))
            ).close()
        except psycopg.Error as exc:
            raise self._cannot_connect(exc) from exc
        pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            self._conninfo,
            min_size=self.pool_min,
            max_size=max(self.pool_max, self.pool_min),
            open=False,
            timeout=self.pool_timeout,
            kwargs={"autocommit": True, "prepare_threshold": None},
            configure=self._configure,
            check=ConnectionPool.check_connection,
            name="meterops-store",
        )
        try:
            pool.open(wait=True, timeout=self.pool_timeout)
        except Exception as exc:
            pool.close()
            raise self._cannot_connect(exc) from exc
        return pool

    def _cannot_connect(self, exc: Exception) -> Unavailable:
        return Unavailable(
            f"cannot connect to PostgreSQL at {self._where}: {str(exc).strip()}; "
            f"check that the server runs and the URL is right, then retry in "
            f"{_RETRY_AFTER:.0f} s",
            retry_after=_RETRY_AFTER,
        )

    @staticmethod
    def _configure(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        # temp_buffers must be set before the session first uses a temp table;
        # extra_float_digits > 0 makes the server print floats exactly (shortest form).
        conn.execute("SET temp_buffers = '128MB'")
        conn.execute("SET extra_float_digits = 3")
        conn.execute("SET TIME ZONE 'UTC'")

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A pooled connection; driver errors come out as meterops errors.

        A broken connection is discarded by the pool, never handed out again.
        After a lost server the pool itself is replaced on the next call (its
        own reconnection backs off for up to minutes), so the first call after
        the server is back works.
        """
        import psycopg

        with self._lock:
            if self._pool is None:
                raise BackendError("the store is not open: call open() first")
            if self._lost:
                self._pool.close()
                self._pool = self._new_pool()
                self._lost = False
            pool = self._pool
        try:
            with pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout
            state = getattr(exc, "sqlstate", None)
            # no SQLSTATE (pool timeout, socket gone), connection exception, shutdown
            self._lost = state is None or state[:2] in ("08", "57")
            raise Unavailable(
                f"PostgreSQL at {self._where} is unavailable ({str(exc).strip()}); "
                f"retry in {_RETRY_AFTER:.0f} s",
                retry_after=_RETRY_AFTER,
            ) from exc
        except psycopg.Error as exc:
            raise BackendError(f"PostgreSQL store error: {str(exc).strip()}") from exc

    def _migrate(self) -> None:
        with self._connection() as conn, conn.transaction():
            # Serialise concurrent openers: the second sees the first's work.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                for statement in statements(script):
                    conn.execute(statement)  # fixed DDL from _sql.py
                conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
            self._covariates = self._read_covariates(conn)

    @staticmethod
    def _read_covariates(conn: psycopg.Connection[tuple[Any, ...]]) -> list[str]:
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'readings'::regclass "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ).fetchall()
        return [str(r[0]) for r in rows if r[0] not in RESERVED]

    def _ensure_covariates(
        self, conn: psycopg.Connection[tuple[Any, ...]], names: Sequence[str]
    ) -> None:
        """Add a float8 column per new covariate (inside the caller's transaction)."""
        missing = [check_covariate(n) for n in names if n not in self._covariates]
        if not missing:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        self._covariates = self._read_covariates(conn)
        for name in missing:
            if name not in self._covariates:
                conn.execute(
                    f'ALTER TABLE readings ADD COLUMN IF NOT EXISTS "{name}" DOUBLE PRECISION'
                )
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
        covs = list(good.covariates)
        for name in covs:
            check_covariate(name)
        n = len(good)
        new_mask = np.ones(n, dtype=bool)
        duplicates = 0
        letters = dead
        with self._connection() as conn:
            try:
                with conn.transaction():
                    self._ensure_covariates(conn, covs)
                    row = conn.execute(
                        "INSERT INTO batches (created_at, lineage, inserted, lake_pending) "
                        "VALUES (%s, %s, 0, 1) RETURNING id",
                        (now_us(), json.dumps(lineage)),
                    ).fetchone()
                    batch_id = int(row[0]) if row else 0
                    inserted = self._copy_new(conn, good, covs, batch_id) if n else 0
                    if inserted < 0:  # some keys are stored already: the careful path
                        inserted = self._insert(conn, good, covs, batch_id)
                    if inserted < n:
                        existing = self._existing(conn, batch_id)
                        idx = np.array([e[0] for e in existing], dtype=np.int64)
                        same = np.array([bool(e[1]) for e in existing], dtype=bool)
                        new_mask[idx] = False
                        duplicates = int(same.sum())
                        conflicts = idx[~same].tolist()
                        if conflicts:
                            letters = pa.concat_tables(
                                [
                                    dead.select(DEADLETTER_SCHEMA.names).cast(DEADLETTER_SCHEMA),
                                    conflict_letters(good, conflicts, origins),
                                ]
                            )
                    written_dead = self._insert_deadletters(conn, letters)
                    tally = self._write_scored(conn, scored or NOTHING_SCORED, good, new_mask)
                    predictions, _, scores, actuals = tally
                    conn.execute(
                        "UPDATE batches SET inserted = %s WHERE id = %s", (inserted, batch_id)
                    )
            except BaseException:
                # Our covariate cache may hold columns a rolled-back ALTER never made.
                self._covariates = []
                raise
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

    @staticmethod
    def _write_scored(
        conn: psycopg.Connection[tuple[Any, ...]],
        scored: Scored,
        good: ReadingBatch,
        new_mask: np.ndarray,
    ) -> tuple[int, int, int, int]:
        """Store ``scored`` inside the caller's transaction, after the readings.

        ``new_mask`` marks the rows of ``good`` this write inserted. Returns
        (predictions, anomalies, scores, actuals) inserted or filled.
        """
        # A batch is small next to the tables: probe their indexes row by row,
        # whatever the statistics say (they lag behind a growing table).
        conn.execute(BY_INDEX)
        actuals = 0
        fresh = good.table.filter(new_mask) if len(good) else None
        if (
            fresh is not None
            and fresh.num_rows
            and _scalar(conn, "SELECT EXISTS (SELECT 1 FROM predictions)")
        ):
            # (b) stored predictions waiting for a reading this write inserted; before
            # this batch's predictions go in, which get their actual as they do
            _stage(conn, "_r", fresh.select(["meter_id", "ts", "value"]))
            cur = conn.execute(FILL_ACTUALS)
            actuals += max(cur.rowcount, 0)
        made = seen = NOTHING_INSERTED
        if scored.predictions.num_rows:
            rows = prediction_rows(
                scored.predictions,
                fresh,
                lambda ids: _spans(conn, ids),
                lambda rows: _stored_values(conn, rows),
            )
            new = _insert_new(conn, "predictions", rows, "actual", PREDICTION_KEY)
            with conn.cursor() as cur:
                cur.executemany(store_leads_sql("%s"), prediction_leads(rows))
            made = pa.table({"meter_id": new.column(0), "flag": pc.is_valid(new.column(1))})
            actuals += int(pc.sum(made.column("flag")).as_py() or 0)
        if scored.scores.num_rows:
            new = _insert_new(conn, "scores", score_rows(scored.scores), "is_anomaly", SCORE_KEY)
            seen = new.rename_columns(["meter_id", "flag"])
        tallies = meter_tallies(made, seen)
        if tallies[0]:
            conn.execute(
                "INSERT INTO meters AS m (meter_id, predictions, anomalies) "
                "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
                "ON CONFLICT (meter_id) DO UPDATE SET "
                "predictions = m.predictions + excluded.predictions, "
                "anomalies = m.anomalies + excluded.anomalies",
                tallies,
            )
        if scored.online_metrics.num_rows:
            m = scored.online_metrics.select(ONLINE_METRIC_SCHEMA.names)
            conn.execute(
                f"INSERT INTO online_metrics ({ONLINE_METRICS}) SELECT * FROM unnest("  # noqa: S608
                "%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], "
                "%s::float8[], %s::float8[], %s::float8[], %s::float8[]) ON CONFLICT DO NOTHING",
                [column.to_pylist() for column in m.columns],
            )
        if scored.checkpoints:
            with conn.cursor() as cur:
                cur.executemany(_CHECKPOINT_UPSERT, checkpoint_rows(scored.checkpoints))
        return made.num_rows, sum(tallies[2]), seen.num_rows, actuals

    @staticmethod
    def _copy_new(
        conn: psycopg.Connection[tuple[Any, ...]],
        good: ReadingBatch,
        covs: list[str],
        batch_id: int,
    ) -> int:
        """COPY ``good`` straight into ``readings`` if none of its keys is stored; else -1.

        The common case (a batch of new readings) costs one COPY in key order
        plus a small meters upsert. A stored key fails the COPY with a unique
        violation; the savepoint undoes it and the caller takes the
        temp-table path, which sorts duplicates from conflicts.
        """
        n = len(good)
        t = by_key(good.table.select(["meter_id", "ts", "value", *covs]), KEY_COLUMNS)
        rows = t.append_column("batch", pa.array(np.full(n, batch_id, dtype=np.int64)))
        if not _copy_into(conn, "readings", rows):
            return -1
        keys = pa.table(
            {"meter_id": t.column("meter_id"), "ts": pc.cast(t.column("ts"), pa.int64())}
        )
        per_meter = keys.group_by("meter_id", use_threads=False).aggregate(
            [("ts", "min"), ("ts", "max"), ("ts", "count")]
        )
        conn.execute(
            _METERS_FROM_ARRAYS,
            [
                per_meter.column(name).to_pylist()
                for name in ("meter_id", "ts_min", "ts_max", "ts_count")
            ],
        )
        return n

    @staticmethod
    def _insert(
        conn: psycopg.Connection[tuple[Any, ...]],
        good: ReadingBatch,
        covs: list[str],
        batch_id: int,
    ) -> int:
        """Stage ``good`` with COPY, insert what is new, update meters; return rows inserted."""
        n = len(good)
        t = good.table
        cov_defs = "".join(f', "{x}" DOUBLE PRECISION' for x in covs)
        conn.execute("SET LOCAL work_mem = '256MB'")
        conn.execute(
            'CREATE TEMP TABLE _in (i BIGINT, meter_id TEXT COLLATE "C", ts BIGINT, '
            f"value DOUBLE PRECISION{cov_defs}) ON COMMIT DROP"
        )
        payload = copy_binary(
            [
                pa.array(np.arange(n, dtype=np.int64)),
                t.column("meter_id"),
                t.column("ts"),
                t.column("value"),
                *(t.column(x) for x in covs),
            ]
        )
        with conn.cursor() as cur, cur.copy("COPY _in FROM STDIN (FORMAT binary)") as copy:
            copy.write(payload)
        cols = _quoted(covs)
        row = conn.execute(
            f"""
            WITH ins AS (
                INSERT INTO readings (meter_id, ts, value{cols}, batch)
                SELECT meter_id, ts, value{cols}, %(batch)s FROM _in ORDER BY meter_id, ts
                ON CONFLICT DO NOTHING
                RETURNING meter_id, ts
            ), agg AS (
                SELECT meter_id, min(ts) AS first_ts, max(ts) AS last_ts, count(*) AS n
                FROM ins GROUP BY meter_id
            ), up AS (
                INSERT INTO meters AS m (meter_id, first_ts, last_ts, readings)
                SELECT meter_id, first_ts, last_ts, n FROM agg ORDER BY meter_id
                {_METERS_UPSERT}
            )
            SELECT coalesce(sum(n), 0) FROM agg
            """,  # noqa: S608 - covariate names are validated identifiers
            {"batch": batch_id},
        ).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _existing(
        conn: psycopg.Connection[tuple[Any, ...]], batch_id: int
    ) -> list[tuple[int, bool]]:
        """(row, same value?) for staged rows whose key was stored before this batch."""
        # The staged rows are at most one batch: probe the primary key per row
        # rather than letting a hash join scan the whole readings table.
        conn.execute("SET LOCAL enable_hashjoin = off")
        conn.execute("SET LOCAL enable_mergejoin = off")
        rows = conn.execute(
            "SELECT s.i, r.value IS NOT DISTINCT FROM s.value FROM _in s "
            "JOIN readings r ON r.meter_id = s.meter_id AND r.ts = s.ts WHERE r.batch <> %s",
            (batch_id,),
        ).fetchall()
        return [(int(i), bool(same)) for i, same in rows]

    @staticmethod
    def _insert_deadletters(conn: psycopg.Connection[tuple[Any, ...]], dead: pa.Table) -> int:
        if dead.num_rows == 0:
            return 0
        cols = [dead.column(f.name).to_pylist() for f in DEADLETTER_SCHEMA]
        cur = conn.execute(
            'INSERT INTO deadletters (source, "offset", meter_id, ts, value, reason, raw, '
            "received_at) SELECT s, o, m, t, v, r, w, %s FROM unnest("
            "%s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[], "
            '%s::text[]) AS u(s, o, m, t, v, r, w) ON CONFLICT (source, "offset") DO NOTHING',
            (now_us(), *cols),
        )
        return max(cur.rowcount, 0)

    # -- reads -------------------------------------------------------------
    def readings(
        self,
        meter_id: str | None = None,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
    ) -> ReadingBatch:
        where, args = range_filter("%s", meter_id, start, end)
        return self._select(" AND ".join(where), args)

    def _select(self, where: str, args: Sequence[Any]) -> ReadingBatch:
        with self._connection() as conn:
            covs = self._read_covariates(conn)
            cols = "meter_id, ts, value" + _quoted(covs)
            data = bytearray()
            with (
                conn.cursor() as cur,
                cur.copy(
                    f"COPY (SELECT {cols} FROM readings WHERE {where} "  # noqa: S608
                    "ORDER BY meter_id, ts) TO STDOUT (FORMAT csv)",
                    args,
                ) as copy,
            ):
                for block in copy:
                    data += block
        if not data:
            return ReadingBatch.empty(covs)
        names = ["meter_id", "ts", "value", *covs]
        types = {"meter_id": pa.string(), "ts": pa.int64()}
        types.update({x: pa.float64() for x in ["value", *covs]})
        table = pacsv.read_csv(
            pa.BufferReader(bytes(data)),
            read_options=pacsv.ReadOptions(column_names=names),
            convert_options=pacsv.ConvertOptions(
                column_types=types, quoted_strings_can_be_null=False
            ),
        )
        table = table.set_column(1, "ts", table.column("ts").cast(TS_TYPE))
        return ReadingBatch(table.cast(schema_for(covs)))

    def _frame(self, sql: str, args: Sequence[Any], columns: list[str]) -> pd.DataFrame:
        with self._connection() as conn:
            rows = conn.execute(sql, args).fetchall()
        return pd.DataFrame.from_records(rows, columns=columns)

    def deadletters(
        self, reason: str | None = None, limit: int | None = None, replayed: bool = False
    ) -> pd.DataFrame:
        where: list[str] = ["true"]
        args: list[Any] = []
        if reason is not None:
            where.append("reason = %s")
            args.append(reason)
        if not replayed:
            where.append("replayed_at IS NULL")
        clauses = " AND ".join(where)  # fixed clauses; values are bound parameters
        sql = (
            'SELECT id, source, "offset", meter_id, ts, value, reason, raw, received_at, '  # noqa: S608
            f"replayed_at FROM deadletters WHERE {clauses} ORDER BY id DESC"
        )
        if limit is not None:
            sql += " LIMIT %s"
            args.append(int(limit))
        columns = ["id", "source", "offset", "meter_id", "ts", "value", "reason", "raw"]
        frame = self._frame(sql, args, [*columns, "received_at", "replayed_at"])
        for col in ("received_at", "replayed_at"):
            frame[col] = pd.to_datetime(frame[col].astype("Int64"), unit="us", utc=True)
        return frame

    def mark_replayed(self, ids: Sequence[int]) -> int:
        with self._connection() as conn:
            cur = conn.execute(
                "UPDATE deadletters SET replayed_at = %s "
                "WHERE id = ANY(%s::bigint[]) AND replayed_at IS NULL",
                (now_us(), [int(i) for i in ids]),
            )
            return max(cur.rowcount, 0)

    def counts(self) -> StoreCounts:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT coalesce(sum(readings), 0), count(*) FILTER (WHERE readings > 0), "
                "max(last_ts), coalesce(sum(predictions), 0), coalesce(sum(anomalies), 0) "
                "FROM meters"
            ).fetchone()
            by_reason = conn.execute(
                "SELECT reason, count(*) FROM deadletters GROUP BY reason"
            ).fetchall()
        readings, meters, last, predictions, anomalies = row if row else (0, 0, None, 0, 0)
        reasons = {str(k): int(v) for k, v in by_reason}
        return StoreCounts(
            readings=int(readings),
            meters=int(meters),
            deadletters=sum(reasons.values()),
            deadletters_by_reason=reasons,
            last_ts=None if last is None else pd.Timestamp(int(last), unit="us", tz="UTC"),
            predictions=int(predictions),
            anomalies=int(anomalies),
        )

    def meters(self) -> pd.DataFrame:
        frame = self._frame(
            "SELECT meter_id, first_ts, last_ts, readings, registered, cluster FROM meters "
            "ORDER BY meter_id",
            [],
            ["meter_id", "first_ts", "last_ts", "readings", "registered", "cluster"],
        )
        for col in ("first_ts", "last_ts"):
            frame[col] = pd.to_datetime(frame[col].astype("Int64"), unit="us", utc=True)
        frame["readings"] = frame["readings"].astype("int64")
        frame["registered"] = frame["registered"].astype(bool)
        frame["cluster"] = frame["cluster"].astype("Int64")
        return frame

    def set_clusters(self, clusters: Mapping[str, int]) -> None:
        pairs = sorted((str(m), int(k)) for m, k in clusters.items())
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO meters (meter_id, cluster) "
                "SELECT * FROM unnest(%s::text[], %s::bigint[]) ORDER BY 1 "
                "ON CONFLICT (meter_id) DO UPDATE SET cluster = excluded.cluster",
                ([m for m, _ in pairs], [k for _, k in pairs]),
            )

    # -- scored ------------------------------------------------------------
    def accuracy(self, since: pd.Timestamp | None = None, by_meter: bool = True) -> pd.DataFrame:
        args = [] if since is None else [int(pd.Timestamp(since).value // 1000)]
        with self._connection() as conn:
            rows = conn.execute(accuracy_sql(by_meter, since is not None, "%s"), args).fetchall()
        return accuracy_frame(rows, by_meter)

    def checkpoint(self, name: str) -> Checkpoint | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT state, offsets FROM checkpoints WHERE name = %s", (name,)
            ).fetchone()
        return None if row is None else checkpoint_from(name, row[0], row[1])

    def register_meters(self, meter_ids: Sequence[str]) -> None:
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO meters (meter_id, registered) "
                "SELECT m, 1 FROM unnest(%s::text[]) AS u(m) ORDER BY m "
                "ON CONFLICT (meter_id) DO UPDATE SET registered = 1",
                (sorted(set(meter_ids)),),
            )

    def registered_meters(self) -> set[str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT meter_id FROM meters WHERE registered = 1").fetchall()
        return {str(r[0]) for r in rows}

    # -- lake outbox ---------------------------------------------------------
    def pending_lake_batches(self) -> list[int]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT id FROM batches WHERE lake_pending = 1 ORDER BY id"
            ).fetchall()
        return [int(r[0]) for r in rows]

    def batch_readings(self, batch_id: int) -> ReadingBatch:
        return self._select("batch = %s", [int(batch_id)])

    def lake_done(self, batch_id: int) -> None:
        with self._connection() as conn:
            conn.execute("UPDATE batches SET lake_pending = 0 WHERE id = %s", (int(batch_id),))
