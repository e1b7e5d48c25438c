"""Whole Arrow tables into SQLite as one bound BLOB, through ``_columns.c``.

Python's ``sqlite3`` makes a Python object of every value and binds it: about
3 us of a 13-column row, where SQLite itself inserts it in about 1 us. The
``mo_columns`` virtual table (compiled from ``_columns.c`` when the package is
installed, see ``hatch_build.py``) reads the rows from one BLOB that
:func:`pack` lays out from the Arrow buffers, so the values go from Arrow to
SQLite's B-tree in C.

Python's ``sqlite3`` cannot load extensions here (it is often built without),
so the module is registered with SQLite's ``sqlite3_auto_extension``, through
ctypes, in the SQLite library that ``_sqlite3`` links: every connection opened
afterwards has it. :data:`AVAILABLE` is true only if a fresh connection really
got it; otherwise (no compiler at install, a Python with its own static
SQLite) the store binds row by row, with the same results.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["AVAILABLE", "LIBRARY", "pack", "table_name", "table_sql"]

LIBRARY = Path(__file__).with_name("libmocolumns.so.1")  # not a module suffix: never imported
_MAGIC = 0x4D4F434F4C530001
_INTEGER, _REAL, _TEXT = 1, 2, 3
_keep: list[Any] = []  # the loaded libraries and the registered entry point, for good


def _sqlite_library() -> str | None:
    """Path of the SQLite library Python's ``sqlite3`` runs on, if it is a shared one."""
    with contextlib.suppress(OSError), Path("/proc/self/maps").open(encoding="utf-8") as maps:
        for line in maps:
            path = line.rsplit(" ", 1)[-1].strip()
            if "libsqlite3" in Path(path).name:
                return path
    return ctypes.util.find_library("sqlite3")


def _register() -> bool:
    found = _sqlite_library()
    if not LIBRARY.exists() or found is None:
        return False
    try:
        extension = ctypes.CDLL(str(LIBRARY))
        library = ctypes.CDLL(found)
    except OSError:
        return False
    entry = ctypes.cast(extension.sqlite3_mocolumns_init, ctypes.c_void_p)
    library.sqlite3_auto_extension.argtypes = [ctypes.c_void_p]
    library.sqlite3_cancel_auto_extension.argtypes = [ctypes.c_void_p]
    if library.sqlite3_auto_extension(entry) != 0:
        return False
    _keep.extend([extension, library, entry])
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            conn.execute(f"CREATE VIRTUAL TABLE temp.{table_sql(1)}")
    except sqlite3.Error:  # Python's sqlite3 runs on another copy of SQLite
        library.sqlite3_cancel_auto_extension(entry)
        return False
    return True


def table_name(columns: int) -> str:
    """The (temp) virtual table that reads batches of ``columns`` columns."""
    return f"_columns{columns}"


def table_sql(columns: int) -> str:
    """``name USING mo_columns(columns)``, to create :func:`table_name`."""
    return f"{table_name(columns)} USING mo_columns({columns})"


def _padded(data: Any, size: int) -> list[Any]:
    return [data, bytes(-size % 8)]


def _header(*values: int) -> bytes:
    return np.array(values, dtype=np.int64).tobytes()


def _nulls(array: pa.Array) -> list[Any]:
    if array.null_count == 0:
        return []
    mask = array.is_null().to_numpy(zero_copy_only=False).view(np.uint8)
    return _padded(mask, len(mask))


def _column(array: pa.Array) -> list[Any]:
    """One column's section of the BLOB (layout in ``_columns.c``)."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        array = array.dictionary_decode()
        kind = array.type
    if pa.types.is_timestamp(kind):
        array = pc.cast(array, pa.int64())
        kind = array.type
    if pa.types.is_floating(kind):  # a null becomes NaN, which SQLite reads as NULL
        values = array.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        return [_header(_REAL, 0), values]
    has_nulls = int(array.null_count > 0)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        values = pc.cast(array, pa.int64()).fill_null(0).to_numpy()
        return [_header(_INTEGER, has_nulls), *_nulls(array), values]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        array = pc.cast(array, pa.string())
        n = len(array)
        _, offsets_buffer, data = array.buffers()
        offsets = (
            np.frombuffer(offsets_buffer, np.int32, n + 1, array.offset * 4)
            if offsets_buffer is not None
            else np.zeros(n + 1, np.int32)
        )
        start, end = int(offsets[0]), int(offsets[-1])
        text = memoryview(data)[start:end] if data is not None else b""
        return [
            _header(_TEXT, has_nulls),
            *_nulls(array),
            *_padded(offsets - np.int32(start), 4 * (n + 1)),
            _header(end - start),
            *_padded(text, end - start),
        ]
    raise TypeError(f"mo_columns takes integer, real and text columns, not {kind}")


def pack(table: pa.Table | pa.RecordBatch) -> bytes:
    """``table`` as the BLOB ``mo_columns`` reads (timestamps as their integers)."""
    parts: list[Any] = [_header(_MAGIC, table.num_columns, table.num_rows)]
    for column in table.columns:
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        parts += _column(array)
    return b"".join(parts)


AVAILABLE = _register()
