"""The SQLite column module: Arrow tables in as one BLOB, out as the same rows."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from meterops.backends import make_store
from meterops.errors import ConfigError
from meterops.settings import load_settings
from meterops.store import _native
from meterops.store.base import Store
from meterops.store.sqlite import FILL_ACTUALS, SQLiteStore

pytestmark = pytest.mark.skipif(
    not _native.AVAILABLE, reason="the column module did not build (no C compiler?)"
)

TABLE = pa.table(
    {
        "text": pa.array(["m-1", None, "héllo wörld", ""]),
        "integer": pa.array([1, None, -3, 2**40]),
        "real": pa.array([1.5, None, float("nan"), -2.0]),
        "flag": pa.array([True, False, None, True]),
        "ts": pa.array([0, 1, 2, 3_600_000_000], pa.timestamp("us", tz="UTC")),
        "small": pa.array([1, 2, 3, 4], pa.int32()),
        "f32": pa.array([0.5, 1.5, None, 2.5], pa.float32()),
        "dict": pa.array(["a", "b", "a", None]).dictionary_encode(),
    }
)


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(":memory:")
    c.execute(f"CREATE VIRTUAL TABLE temp.{_native.table_sql(TABLE.num_columns)}")
    yield c
    c.close()


def read(conn: sqlite3.Connection, blob: bytes) -> list[tuple[object, ...]]:
    name = _native.table_name(TABLE.num_columns)
    return conn.execute(f"SELECT * FROM temp.{name}(?)", (blob,)).fetchall()  # noqa: S608


def bound_row_by_row(table: pa.Table) -> list[tuple[object, ...]]:
    """What SQLite stores when Python binds the same rows one value at a time."""
    c = sqlite3.connect(":memory:")
    names = ", ".join(f"c{i}" for i in range(table.num_columns))
    c.execute(f"CREATE TABLE t ({names})")
    rows = [
        tuple(int(v.timestamp() * 1e6) if hasattr(v, "timestamp") else v for v in row.values())
        for row in table.to_pylist()
    ]
    c.executemany(f"INSERT INTO t VALUES ({', '.join('?' * table.num_columns)})", rows)  # noqa: S608
    return c.execute("SELECT * FROM t").fetchall()


def test_rows_read_back_as_binding_them_one_by_one_stores_them(
    conn: sqlite3.Connection,
) -> None:
    expected = bound_row_by_row(TABLE)
    assert expected[1][:3] == (None, None, None)  # nulls stay NULL, NaN becomes NULL
    assert read(conn, _native.pack(TABLE)) == expected
    for start, length in ((1, 2), (3, 1), (0, 0), (2, 2)):  # slices: offset buffers
        assert (
            read(conn, _native.pack(TABLE.slice(start, length))) == expected[start : start + length]
        )
    chunked = pa.concat_tables([TABLE.slice(0, 1), TABLE.slice(1)])
    assert read(conn, _native.pack(chunked)) == expected


def test_a_malformed_or_mismatched_blob_is_an_error_not_a_crash(
    conn: sqlite3.Connection,
) -> None:
    with pytest.raises(sqlite3.OperationalError, match="not a column batch"):
        read(conn, b"junk")
    with pytest.raises(sqlite3.OperationalError, match="another number of columns"):
        read(conn, _native.pack(TABLE.select([0, 1])))
    with pytest.raises(sqlite3.OperationalError, match="must be a BLOB"):
        read(conn, "text")  # type: ignore[arg-type]
    good = _native.pack(TABLE)
    rng = random.Random(0)  # noqa: S311 - reproducible corruption, not secrets
    errors = 0
    for _ in range(3000):  # flipped bytes and truncations: read or refused, never out of bounds
        blob = bytearray(good)
        blob[rng.randrange(len(blob))] = rng.randrange(256)
        if rng.random() < 0.3:
            blob = blob[: rng.randrange(len(blob))]
        try:
            read(conn, bytes(blob))
        except sqlite3.OperationalError as exc:
            assert "mo_columns" in str(exc) or "decode" in str(exc)  # a flipped UTF-8 byte
            errors += 1
    assert errors > 0


def test_unsupported_column_types_are_refused_before_sqlite() -> None:
    with pytest.raises(TypeError, match="integer, real and text"):
        _native.pack(pa.table({"b": pa.array([b"x"], pa.binary())}))


def test_the_store_url_chooses_the_binding(tmp_path: Path) -> None:
    def store(url: str) -> Store:
        return make_store(load_settings(None, project_dir=tmp_path, backends={"store": url}))

    columns, rows = store("sqlite:///a.db"), store("sqlite:///a.db?bind=rows")
    assert isinstance(columns, SQLiteStore) and columns.bind_columns
    assert isinstance(rows, SQLiteStore) and not rows.bind_columns
    assert rows.path == str(tmp_path / "a.db")
    with pytest.raises(ConfigError, match="bind=columns"):
        store("sqlite:///a.db?bind=fast")


def test_waiting_predictions_are_found_by_primary_key(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "s.db")).open() as store:
        name = store._columns(pa.table({f"c{i}": [0] for i in range(4)}))
        plan = store.conn.execute(
            f"EXPLAIN QUERY PLAN {FILL_ACTUALS.format(waiting=name)}", (b"",)
        ).fetchall()
    details = [row[-1] for row in plan]
    assert any(d.startswith("SCAN w VIRTUAL TABLE") for d in details), details
    assert "SEARCH predictions USING PRIMARY KEY (ts=? AND meter_id=? AND horizon=?)" in details
