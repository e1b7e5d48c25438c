"""Meter files (CSV, CSV.gz, Parquet) into reading batches, every row accounted for.

The format is found by magic bytes (``PAR1`` is Parquet, ``1f 8b`` is gzip,
anything else must be delimited text). A file that cannot be read at all
raises :class:`~meterops.errors.InputError` with a one-line message naming the
file; a file that can be read never loses a row: each data row appears exactly
once in the output, good or rejected. Rejected rows carry the private columns
``_reject`` (reason) and ``_raw`` (the row text) and null in every field that
could not be parsed; the columns exist only when some row is bad.

Reasons set here (validation adds its own later):

=================================  ==============================================
reason                             when
=================================  ==============================================
invalid encoding                   the row is not valid UTF-8 (binary junk)
wrong column count                 the row splits into a different number of fields
missing meter_id                   empty or blank meter id
missing timestamp                  empty timestamp (or a null marker, see below)
unparseable timestamp              text that is no timestamp
unparseable value                  text that is no number
unparseable covariate <name>       text that is no number in a covariate
=================================  ==============================================

Not rejected here: ``nan``/``inf``/``-inf`` (parsed to float, NaN stays
distinct from null), empty values or null markers (``NA``, ``N/A``, ``null``,
``None``, ``?``; a missing value), huge numbers, bad meter-id characters.
Blank lines are not rows. Fields are stripped of surrounding whitespace.

Speed: a clean CSV is read once by ``pyarrow.csv`` with typed columns; only
when that fails (or finds a bad row) is the file read again as text and
converted column by column with Arrow and pandas vectorised kernels. Python
loops run only over rows that are already known to be bad.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "m.csv"
>>> _ = path.write_text("meter_id,ts,value\\nm1,2024-01-01T00:00Z,1.5\\nm1,oops,2\\n")
>>> batch, summary = read_file(path, FileFormat())
>>> summary.rows, summary.rejected_by_reason
(2, {'unparseable timestamp': 1})
"""

from __future__ import annotations

import bisect
import csv
import gzip
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pandas.tseries.api import guess_datetime_format  # type: ignore[attr-defined]

from meterops.errors import ConfigError, InputError
from meterops.types import RAW, REJECT, TS_TYPE, ReadingBatch, schema_for

__all__ = ["FileFormat", "FileSummary", "iter_file", "read_file"]

Mask = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]
TsKind = Literal["aware", "naive", "epoch", "text"]

DELIMITERS = (",", ";", "\t", "|")
MISSING_TOKENS = ("", "na", "n/a", "null", "none", "?")
_NULL_VALUES = sorted({v for t in MISSING_TOKENS for v in (t, t.upper(), t.capitalize())})
_NUMBER = r"(?i)^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|nan|inf|infinity)$"
_DECIMAL_COMMA = r"^([+-]?\d+),(\d+)$"
# An explicit zone after a time of day: "...T10:00Z", "... 10:00:00+02:00", "...10 UTC".
_ZONED = (
    r"(?i)[t ]\d{1,2}(?::?\d{2}(?::?\d{2}(?:[.,]\d+)?)?)?\s*(?:z|utc|gmt|[+-]\d{2}(?::?\d{2})?)$"
)
_DATE_LIKE = re.compile(r"\d{1,4}\D+\d{1,2}")
_METER_CHARS = re.compile(r"[^A-Za-z0-9._:-]+")
_UTC_NAMES = {"UTC", "ETC/UTC", "Z", "GMT", "ETC/GMT", "ZULU", "UCT"}
_NAT = np.iinfo(np.int64).min
_SPACES = " \t\v\f"
# Epoch seconds of 0001-01-01 and 9999-12-31T23:59:59: beyond them a number is no time.
_EPOCH_RANGE = (-62_135_596_800.0, 253_402_300_799.0)
_SAMPLE_BYTES = 1 << 18
_BLOCK_BYTES = 1 << 22
_LENIENT_PROBE = 100
_COMPRESSED = {
    b"PK\x03\x04": "zip",
    b"BZh": "bzip2",
    b"\xfd7zXZ": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"7z\xbc\xaf": "7z",
}


@dataclass(frozen=True)
class FileFormat:
    """How to read a meter file; the defaults fit ``meter_id,ts,value[,covariates...]``.

    ``covariates=None`` takes every other numeric-looking column except
    ``label``. ``meter_id`` names the meter of a single-series file (it wins
    over a meter column); without either, the file stem is the meter id.
    Naive timestamps are wall time in ``timezone`` (an ambiguous hour takes its
    first occurrence, a nonexistent one shifts forward); explicit offsets win.
    ``ts_format`` is a strftime format tried before ISO-8601; ``dayfirst``
    guides the lenient fallback for rows that are not ISO-8601.
    """

    meter_col: str = "meter_id"
    ts_col: str = "ts"
    value_col: str = "value"
    covariates: tuple[str, ...] | None = None
    meter_id: str | None = None
    timezone: str = "UTC"
    delimiter: str | None = None
    ts_format: str | None = None
    dayfirst: bool = False

    def __post_init__(self) -> None:
        if self.covariates is not None and not isinstance(self.covariates, tuple):
            object.__setattr__(self, "covariates", tuple(self.covariates))
        cols = (self.meter_col, self.ts_col, self.value_col)
        if not all(cols) or len(set(cols)) != 3:
            raise ConfigError(
                f"--meter-col, --ts-col and --value-col must be three different names; got {cols}"
            )
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ConfigError(f"--delimiter must be one character; got {self.delimiter!r}")
        if self.covariates is not None and "label" in (c.lower() for c in self.covariates):
            raise ConfigError("a label column is never a covariate; remove it from covariates")
        try:
            pd.Timestamp("2024-01-01").tz_localize(self.timezone)
        except Exception as exc:  # pytz, zoneinfo and dateutil raise different types
            raise ConfigError(
                f"unknown time zone {self.timezone!r} (--timezone / source.timezone);"
                " use an IANA name such as 'Europe/Paris' or 'UTC'"
            ) from exc

    @property
    def is_utc(self) -> bool:
        return self.timezone.upper() in _UTC_NAMES


@dataclass(frozen=True)
class FileSummary:
    """What a file held: ``rows`` data rows, of which ``rejected`` were bad.

    ``meters``, ``ts_min`` and ``ts_max`` describe the rows that were not rejected.
    """

    rows: int
    rejected: int
    rejected_by_reason: dict[str, int]
    meters: int
    ts_min: pd.Timestamp | None
    ts_max: pd.Timestamp | None

    @classmethod
    def of(cls, batch: ReadingBatch) -> FileSummary:
        table = batch.table
        by_reason: dict[str, int] = {}
        if batch.has_rejects:
            reasons = table.column(REJECT)
            counts = pc.value_counts(reasons.drop_null()).to_pylist()
            by_reason = {str(c["values"]): int(c["counts"]) for c in counts}
            table = table.filter(pc.is_null(reasons))
        ts_range = pc.min_max(pc.cast(table.column("ts"), pa.int64()))
        low, high = ts_range["min"].as_py(), ts_range["max"].as_py()
        return cls(
            rows=len(batch),
            rejected=sum(by_reason.values()),
            rejected_by_reason=dict(sorted(by_reason.items())),
            meters=int(pc.count_distinct(table.column("meter_id")).as_py()),
            ts_min=_stamp(low),
            ts_max=_stamp(high),
        )


def read_file(
    path: str | PathLike[str], fmt: FileFormat | None = None
) -> tuple[ReadingBatch, FileSummary]:
    """Read a whole CSV, CSV.gz or Parquet file into one batch and its summary.

    Raises :class:`InputError` when the file cannot be read at all (missing,
    empty, not a table, corrupt, without the needed columns); bad rows do not
    raise, they come back rejected.
    """
    fmt = fmt or FileFormat()
    source = _Source.open(Path(path))
    if source.kind == "parquet":
        batch = _ParquetReader(source, fmt).read()
    else:
        batch = _CsvReader(source, fmt).read()
    return batch, FileSummary.of(batch)


def iter_file(
    path: str | PathLike[str], fmt: FileFormat | None = None, chunk_rows: int = 200_000
) -> Iterator[ReadingBatch]:
    """Yield the rows of a file in batches of at most ``chunk_rows``.

    Parquet files stream batch by batch; CSV files are parsed whole and sliced.
    A batch carries ``_reject``/``_raw`` only when one of its own rows is bad.
    Errors are those of :func:`read_file` (raised on the first ``next``).
    """
    if chunk_rows <= 0:
        raise ConfigError(f"chunk_rows must be positive; got {chunk_rows}")
    fmt = fmt or FileFormat()
    source = _Source.open(Path(path))
    if source.kind == "parquet":
        yield from _ParquetReader(source, fmt).batches(chunk_rows)
        return
    table = _CsvReader(source, fmt).read().table
    for start in range(0, table.num_rows, chunk_rows):
        part = table.slice(start, chunk_rows)
        if REJECT in part.column_names and part.column(REJECT).null_count == part.num_rows:
            part = part.drop_columns([REJECT, RAW])
        yield ReadingBatch(part)


# --------------------------------------------------------------------------- opening


@dataclass(frozen=True)
class _Source:
    path: Path
    kind: Literal["csv", "parquet"]
    data: bytes | None  # the (decompressed) bytes; None for a Parquet file read from disk

    @classmethod
    def open(cls, path: Path) -> _Source:
        try:
            if path.is_dir():
                raise InputError(f"{path}: is a directory, not a CSV, CSV.gz or Parquet file")
            with path.open("rb") as handle:
                head = handle.read(4)
                if head == b"PAR1":
                    return cls(path, "parquet", None)
                handle.seek(0)
                data = handle.read()
        except FileNotFoundError as exc:
            raise InputError(f"{path}: no such file") from exc
        except OSError as exc:
            raise InputError(f"{path}: cannot be read ({_one_line(exc)})") from exc
        if data[:2] == b"\x1f\x8b":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as exc:
                raise InputError(f"{path}: corrupt gzip data ({_one_line(exc)})") from exc
            if data[:4] == b"PAR1":
                return cls(path, "parquet", data)
        for magic, name in _COMPRESSED.items():
            if data.startswith(magic):
                raise InputError(
                    f"{path}: {name} files are not supported; expected CSV, CSV.gz or Parquet"
                )
        if not data or data.isspace():
            raise InputError(f"{path}: the file is empty")
        return cls(path, "csv", data)

    def default_meter_id(self) -> str:
        name = self.path.name
        for suffix in (".gz", ".csv", ".tsv", ".txt", ".parquet", ".pq"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        return _METER_CHARS.sub("_", name).strip("_")[:128] or "meter"


@dataclass(frozen=True)
class _Plan:
    """Which columns feed which reading field, decided once per file."""

    meter: str | None  # the meter column, or None for the constant meter_const
    meter_const: str
    ts: str
    value: str
    covariates: tuple[str, ...]
    ts_kind: TsKind

    @property
    def used(self) -> list[str]:
        head = [self.meter] if self.meter else []
        return [*head, self.ts, self.value, *self.covariates]


def _plan(
    source: _Source,
    fmt: FileFormat,
    names: list[str],
    looks_numeric: dict[str, bool],
    ts_kind: TsKind,
    hint: str,
) -> _Plan:
    """Map the file's columns to reading fields; InputError when needed ones are absent."""
    meter = None if fmt.meter_id is not None or fmt.meter_col not in names else fmt.meter_col
    wanted = [fmt.ts_col, fmt.value_col, *(fmt.covariates or ())]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputError(
            f"{source.path}: missing column(s) {', '.join(map(repr, missing))};"
            f" found {', '.join(map(repr, names))}{hint};"
            " map them with --meter-col, --ts-col, --value-col"
        )
    if fmt.covariates is not None:
        covariates = fmt.covariates
    else:
        taken = {fmt.meter_col, fmt.ts_col, fmt.value_col, "meter_id", "ts", "value"}
        covariates = tuple(
            c
            for c in names
            if c not in taken
            and c.lower() != "label"
            and not c.startswith("_")
            and looks_numeric.get(c, False)
        )
    return _Plan(
        meter=meter,
        meter_const=fmt.meter_id if fmt.meter_id is not None else source.default_meter_id(),
        ts=fmt.ts_col,
        value=fmt.value_col,
        covariates=covariates,
        ts_kind=ts_kind,
    )


# --------------------------------------------------------------------------- CSV


class _NeedsTextPath(Exception):
    """The typed fast path found something only the text path can explain."""


class _CsvReader:
    def __init__(self, source: _Source, fmt: FileFormat) -> None:
        assert source.data is not None  # noqa: S101 - guaranteed by _Source.open
        self.source = source
        self.fmt = fmt
        data = source.data
        start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        while start < len(data) and data[start : start + 1] in (b"\n", b"\r", b" ", b"\t"):
            start += 1
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        header_bytes = data[start:end].rstrip(b"\r")
        try:
            if b"\x00" in header_bytes:
                raise UnicodeError("NUL byte")
            header = header_bytes.decode("utf-8")
        except UnicodeError as exc:
            raise InputError(
                f"{source.path}: not a CSV, CSV.gz or Parquet file (binary content in the header)"
            ) from exc
        self.body = pa.py_buffer(data).slice(min(end + 1, len(data)))
        sample_text = self._sample_text()
        self.no_rows = self.body.size <= _SAMPLE_BYTES and not sample_text.strip()
        sample_lines = sample_text.splitlines()[:50]
        self.delimiter = fmt.delimiter or _sniff(header, sample_lines)
        fields = next(csv.reader([header], delimiter=self.delimiter, skipinitialspace=True))
        self.names = _unique([_bare(name) for name in fields])
        sample = self._sample_table()
        numeric = {n: _numeric_share(sample.column(n), self.delimiter) >= 0.8 for n in self.names}
        hint = f" (delimiter {self.delimiter!r}; set --delimiter if that is wrong)"
        self.plan = _plan(source, fmt, self.names, numeric, _ts_kind(sample, fmt), hint)

    def _sample_text(self) -> str:
        head: bytes = self.body.slice(0, min(_SAMPLE_BYTES, self.body.size)).to_pybytes()
        if len(head) == _SAMPLE_BYTES:
            head = head[: head.rfind(b"\n") + 1]
        return head.decode("utf-8", "replace")

    def _sample_table(self) -> pa.Table:
        text = self._sample_text().encode("utf-8")
        try:
            table, _ = self._read_text(pa.py_buffer(text), quoted=True)
        except pa.ArrowException:  # the full read will say what is wrong, row by row
            table = pa.table({n: pa.array([], pa.string()) for n in self.names})
        return table

    def read(self) -> ReadingBatch:
        try:
            return self._read_fast()
        except (pa.ArrowException, _NeedsTextPath):
            return self._read_slow()

    def _options(self) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions]:
        read = pacsv.ReadOptions(column_names=self.names, block_size=_BLOCK_BYTES)
        return read, pacsv.ParseOptions(delimiter=self.delimiter)

    def _read_fast(self) -> ReadingBatch:
        plan = self.plan
        if self.no_rows:
            return ReadingBatch.empty(plan.covariates)
        ts_type = {
            "aware": TS_TYPE,
            "naive": pa.timestamp("us"),
            "epoch": pa.float64(),
            "text": pa.string(),
        }[plan.ts_kind]
        types = {c: pa.float64() for c in (plan.value, *plan.covariates)}
        types[plan.ts] = ts_type
        if plan.meter:
            types[plan.meter] = pa.string()
        read, parse = self._options()
        convert = pacsv.ConvertOptions(
            column_types=types,
            include_columns=plan.used,
            null_values=_NULL_VALUES,
            strings_can_be_null=False,
        )
        table = pacsv.read_csv(pa.BufferReader(self.body), read, parse, convert)
        converted = _convert(table, plan, self.fmt, decimal_comma=False, suspect_encoding=False)
        if converted.reasons is not None:
            raise _NeedsTextPath
        return ReadingBatch(_table(converted.columns, None, None))

    def _read_text(self, body: pa.Buffer, quoted: bool) -> tuple[pa.Table, list[Any]]:
        bad: list[Any] = []
        if self.no_rows:
            return pa.table({n: pa.array([], pa.string()) for n in self.names}), bad

        def on_invalid(row: Any) -> str:
            bad.append((row.number, row.text))
            return "skip"

        read = pacsv.ReadOptions(
            column_names=self.names, block_size=_BLOCK_BYTES, use_threads=False
        )
        parse = pacsv.ParseOptions(
            delimiter=self.delimiter,
            invalid_row_handler=on_invalid,
            quote_char='"' if quoted else False,
        )
        convert = pacsv.ConvertOptions(
            column_types=dict.fromkeys(self.names, pa.string()),
            strings_can_be_null=False,
            null_values=[],
            check_utf8=True,
        )
        table = pacsv.read_csv(pa.BufferReader(body), read, parse, convert)
        return table, bad

    def _read_slow(self) -> ReadingBatch:
        raw_bytes = self.body.to_pybytes()
        try:
            raw_bytes.decode("utf-8")
            suspect = False
            body = self.body
        except UnicodeDecodeError:
            suspect = True
            body = pa.py_buffer(raw_bytes.decode("utf-8", "replace").encode("utf-8"))
        try:
            table, bad = self._read_text(body, quoted=True)
            if any(_any(pc.match_substring_regex(table.column(n), r"[\r\n]")) for n in self.names):
                # An unbalanced quote swallowed line ends: read again taking quotes literally.
                table, bad = self._read_text(body, quoted=False)
                table = _dequote(table)
        except pa.ArrowException as exc:
            raise InputError(
                f"{self.source.path}: cannot be parsed as CSV ({_one_line(exc)})"
            ) from exc
        plan = self.plan
        converted = _convert(
            table, plan, self.fmt, decimal_comma=self.delimiter != ",", suspect_encoding=suspect
        )
        raw = None
        if converted.reasons is not None:
            rows = np.flatnonzero(pd.notna(converted.reasons))
            cols = [table.column(n).take(rows) for n in self.names]
            joined = (
                pc.binary_join_element_wise(*cols, self.delimiter) if len(cols) > 1 else cols[0]
            )
            raw = np.full(table.num_rows, None, dtype=object)
            raw[rows] = np.asarray(joined.to_numpy(zero_copy_only=False), dtype=object)
        good = _table(converted.columns, converted.reasons, raw)
        # A line of spaces is a blank line, not a row, though the parser numbered it.
        blanks = sorted(
            number for number, text in bad if not text.strip(_SPACES) and number is not None
        )
        bad = [(number, text) for number, text in bad if text.strip(_SPACES)]
        if not bad:
            return ReadingBatch(good)
        numbers = [
            None if number is None else number - bisect.bisect_left(blanks, number)
            for number, _ in bad
        ]
        reasons = [
            "invalid encoding" if suspect and "\ufffd" in text else "wrong column count"
            for _, text in bad
        ]
        unsplit = _table(
            _null_columns(plan.covariates, len(bad)),
            np.asarray(reasons, dtype=object),
            np.asarray([text for _, text in bad], dtype=object),
        )
        return ReadingBatch(_interleave(good, unsplit, numbers))


def _sniff(header: str, lines: list[str]) -> str:
    """The candidate delimiter the header uses most, ties broken by the data lines."""
    bare = re.sub(r'"[^"]*"', "", header)
    counts = {d: bare.count(d) for d in DELIMITERS}
    if not any(counts.values()):
        return ","

    def score(d: str) -> tuple[int, int, int]:
        steady = sum(1 for line in lines[1:] if line.count(d) == counts[d])
        return counts[d], steady, -DELIMITERS.index(d)

    return max(DELIMITERS, key=score)


def _bare(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].strip()
    return name


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        name = name or f"column{i + 1}"
        if name in seen:
            seen[name] += 1
            name = f"{name}.{seen[name]}"
        seen.setdefault(name, 0)
        out.append(name)
    return out


def _dequote(table: pa.Table) -> pa.Table:
    """Strip one level of CSV quoting from fields read with quoting off."""
    columns = []
    for column in table.columns:
        inner = pc.replace_substring_regex(column, r'^\s*"(.*)"\s*$', r"\1")
        columns.append(pc.replace_substring(inner, '""', '"'))
    return pa.table(columns, names=table.column_names)


def _interleave(good: pa.Table, unsplit: pa.Table, numbers: list[int | None]) -> pa.Table:
    """Put rows the CSV parser could not split back at their place in the file.

    ``numbers`` are the parser's 1-based row numbers (blank lines not counted);
    when one is unknown the rows simply go last.
    """
    both = pa.concat_tables([good, unsplit], promote_options="permissive")
    total = both.num_rows
    if any(n is None for n in numbers):
        return both
    places = np.asarray(numbers, dtype=np.int64) - 1
    if places.min() < 0 or places.max() >= total or len(np.unique(places)) != len(places):
        return both
    order = np.empty(total, dtype=np.int64)
    is_unsplit = np.zeros(total, dtype=bool)
    is_unsplit[places] = True
    order[~is_unsplit] = np.arange(good.num_rows)
    order[places] = good.num_rows + np.arange(len(places))
    return both.take(pa.array(order))


def _ts_kind(sample: pa.Table, fmt: FileFormat) -> TsKind:
    """The cheapest typed reading of the timestamp column that fits the sample."""
    if fmt.ts_format is not None or fmt.ts_col not in sample.column_names:
        return "text"
    text = pc.utf8_trim_whitespace(sample.column(fmt.ts_col))
    text = text.filter(pc.invert(pc.is_in(pc.utf8_lower(text), pa.array(MISSING_TOKENS))))
    if len(text) == 0:
        return "text"
    if not _any(pc.invert(pc.match_substring_regex(text, _NUMBER))):
        return "epoch"
    for kind, target in (("aware", TS_TYPE), ("naive", pa.timestamp("us"))):
        try:
            pc.cast(text, target)
        except pa.ArrowInvalid:
            continue
        return "aware" if kind == "aware" else "naive"
    return "text"


def _numeric_share(column: pa.ChunkedArray, delimiter: str) -> float:
    """Share of non-missing sample cells that parse as numbers (0 when none)."""
    text = pc.utf8_trim_whitespace(column)
    text = text.filter(pc.invert(pc.is_in(pc.utf8_lower(text), pa.array(MISSING_TOKENS))))
    if len(text) == 0:
        return 0.0
    ok = pc.match_substring_regex(text, _NUMBER)
    if delimiter != ",":
        ok = pc.or_(ok, pc.match_substring_regex(text, _DECIMAL_COMMA))
    return float(pc.sum(ok).as_py() or 0) / len(text)


# --------------------------------------------------------------------------- Parquet


class _ParquetReader:
    def __init__(self, source: _Source, fmt: FileFormat) -> None:
        self.source = source
        self.fmt = fmt
        try:
            target = source.path if source.data is None else pa.BufferReader(source.data)
            self.file = pq.ParquetFile(target)
            schema = self.file.schema_arrow
        except (OSError, pa.ArrowException) as exc:
            raise InputError(
                f"{source.path}: corrupt or unreadable Parquet file ({_one_line(exc)})"
            ) from exc
        names = list(schema.names)
        numeric = {n: _is_number_type(schema.field(n).type) for n in names}
        self.plan = _plan(source, fmt, names, numeric, "text", "")
        for name in self.plan.used:
            kind = schema.field(name).type
            fits = _is_number_type(kind) or _is_text_type(kind)
            if name == self.plan.ts:
                fits = fits or pa.types.is_timestamp(kind) or pa.types.is_date(kind)
            elif name == self.plan.meter:
                fits = fits or pa.types.is_dictionary(kind)
            if not fits:
                raise InputError(
                    f"{source.path}: column {name!r} has type {kind}, which cannot hold"
                    f" {'timestamps' if name == self.plan.ts else 'readings'}"
                )

    def _wrap(self, exc: Exception) -> InputError:
        return InputError(f"{self.source.path}: corrupt Parquet data ({_one_line(exc)})")

    def read(self) -> ReadingBatch:
        try:
            table = self.file.read(columns=self.plan.used)
        except (OSError, pa.ArrowException) as exc:
            raise self._wrap(exc) from exc
        return self._convert(table)

    def batches(self, chunk_rows: int) -> Iterator[ReadingBatch]:
        stream = self.file.iter_batches(batch_size=chunk_rows, columns=self.plan.used)
        while True:
            try:
                record_batch = next(stream)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as exc:
                raise self._wrap(exc) from exc
            yield self._convert(pa.Table.from_batches([record_batch]))

    def _convert(self, table: pa.Table) -> ReadingBatch:
        converted = _convert(
            table, self.plan, self.fmt, decimal_comma=False, suspect_encoding=False
        )
        raw = None
        if converted.reasons is not None:
            rows = np.flatnonzero(pd.notna(converted.reasons))
            cols = [
                pc.cast(table.column(n).take(rows), pa.string(), safe=False) for n in self.plan.used
            ]
            joined = pc.binary_join_element_wise(*cols, ",", null_handling="replace")
            raw = np.full(table.num_rows, None, dtype=object)
            raw[rows] = np.asarray(joined.to_numpy(zero_copy_only=False), dtype=object)
        return ReadingBatch(_table(converted.columns, converted.reasons, raw))


def _is_number_type(kind: Any) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    )


def _is_text_type(kind: Any) -> bool:
    if pa.types.is_dictionary(kind):
        return _is_text_type(kind.value_type)
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class _Converted:
    columns: dict[str, Any]  # reading columns in schema order (Arrow arrays)
    reasons: npt.NDArray[np.object_] | None  # aligned with the rows; None if all good


def _convert(
    table: pa.Table,
    plan: _Plan,
    fmt: FileFormat,
    *,
    decimal_comma: bool,
    suspect_encoding: bool,
) -> _Converted:
    """Turn raw columns (typed or text) into reading columns plus a reason per bad row."""
    n = table.num_rows
    checks: list[tuple[str, Mask]] = []  # in priority order: the first reason wins
    if suspect_encoding:
        junk = np.zeros(n, dtype=bool)
        for name in plan.used:
            junk |= _mask(pc.match_substring(table.column(name), "\ufffd"))
        checks.append(("invalid encoding", junk))
    columns: dict[str, Any] = {}
    if plan.meter is None:
        columns["meter_id"] = pa.repeat(pa.scalar(plan.meter_const, pa.string()), n)
    else:
        columns["meter_id"], missing = _meter_ids(table.column(plan.meter))
        checks.append(("missing meter_id", missing))
    ts, missing_ts, bad_ts = _timestamps(table.column(plan.ts), fmt, plan.ts_kind)
    columns["ts"] = ts
    checks += [("missing timestamp", missing_ts), ("unparseable timestamp", bad_ts)]
    columns["value"], bad = _numbers(table.column(plan.value), decimal_comma)
    checks.append(("unparseable value", bad))
    for name in plan.covariates:
        columns[name], bad = _numbers(table.column(name), decimal_comma)
        checks.append((f"unparseable covariate {name}", bad))
    if not any(mask.any() for _, mask in checks):
        return _Converted(columns, None)
    reasons = np.full(n, None, dtype=object)
    for reason, mask in reversed(checks):
        reasons[mask] = reason
    return _Converted(columns, reasons)


def _table(
    columns: dict[str, Any],
    reasons: npt.NDArray[np.object_] | None,
    raw: npt.NDArray[np.object_] | None,
) -> pa.Table:
    schema = schema_for(list(columns)[3:])
    arrays = list(columns.values())
    if reasons is not None:
        schema = schema.append(pa.field(REJECT, pa.string())).append(pa.field(RAW, pa.string()))
        arrays += [pa.array(reasons, pa.string()), pa.array(raw, pa.string())]
    return pa.Table.from_arrays(arrays, schema=schema)


def _null_columns(covariates: tuple[str, ...], n: int) -> dict[str, Any]:
    return {field.name: pa.nulls(n, field.type) for field in schema_for(covariates)}


def _meter_ids(column: Any) -> tuple[Any, Mask]:
    text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    missing = _mask(pc.or_kleene(pc.is_null(text), pc.equal(text, "")))
    if missing.any():
        text = pc.if_else(pa.array(missing), pa.scalar(None, pa.string()), text)
    return text, missing


def _numbers(column: Any, decimal_comma: bool) -> tuple[Any, Mask]:
    """Float64 values and the mask of cells holding text that is no number."""
    kind = column.type
    if _is_number_type(kind) or pa.types.is_boolean(kind):
        return pc.cast(column, pa.float64()), np.zeros(len(column), dtype=bool)
    text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    missing = _missing(text)
    if decimal_comma:
        text = pc.replace_substring_regex(text, _DECIMAL_COMMA, r"\1.\2")
    ok = np.logical_and(_mask(pc.match_substring_regex(text, _NUMBER)), ~missing)
    values = pc.cast(pc.if_else(pa.array(ok), text, pa.scalar(None, pa.string())), pa.float64())
    return values, ~ok & ~missing


def _timestamps(column: Any, fmt: FileFormat, kind: TsKind) -> tuple[Any, Mask, Mask]:
    """UTC timestamps plus the masks of missing and of unparseable cells."""
    arrow_type = column.type
    n = len(column)
    no_rows = np.zeros(n, dtype=bool)
    if pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type):
        missing = _mask(pc.is_null(column))
        if pa.types.is_timestamp(arrow_type) and arrow_type.tz is not None:
            return pc.cast(column, TS_TYPE, safe=False), missing, no_rows
        wall = pc.cast(pc.cast(column, pa.timestamp("us"), safe=False), pa.int64())
        if fmt.is_utc:
            return pc.cast(wall, TS_TYPE), missing, no_rows
        us = _localize(_ints(wall), fmt)
        return _ts_array(us, ~missing), missing, no_rows
    if _is_number_type(arrow_type):
        seconds = _floats(pc.cast(column, pa.float64()))
        missing = _mask(pc.is_null(column))
        us, ok = _epoch(seconds)
        return _ts_array(us, ok), missing, ~ok & ~missing
    text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    missing = _missing(text)
    us, ok = _parse_text_timestamps(text, missing, fmt, epoch=kind == "epoch")
    return _ts_array(us, ok), missing, ~ok & ~missing


def _parse_text_timestamps(
    text: Any, missing: Mask, fmt: FileFormat, epoch: bool
) -> tuple[Ints, Mask]:
    """Parse trimmed timestamp strings: epoch, ts_format, ISO-8601, then leniently."""
    n = len(text)
    us = np.full(n, _NAT, dtype=np.int64)
    done = missing.copy()
    if epoch:
        numeric = _mask(pc.match_substring_regex(text, _NUMBER)) & ~done
        numbers = pc.cast(
            pc.if_else(pa.array(numeric), text, pa.scalar(None, pa.string())), pa.float64()
        )
        got, ok = _epoch(_floats(numbers))
        us[ok] = got[ok]
        done |= ok
    if done.all():
        return us, done & ~missing
    values = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
    zoned = _mask(pc.match_substring_regex(text, _ZONED))
    naive_wall = np.zeros(n, dtype=bool)  # rows whose `us` still holds wall time in fmt.timezone

    def attempt(rows: Mask, **kwargs: Any) -> None:
        idx = np.flatnonzero(rows)
        if len(idx) == 0:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = pd.to_datetime(values[idx], errors="coerce", utc=True, **kwargs)
        got, ok = _us(parsed)
        us[idx[ok]] = got[ok]
        done[idx[ok]] = True
        is_zoned = kwargs.get("format") == "ISO8601"
        fixed = zoned[idx[ok]] if is_zoned else _has_zone(str(kwargs.get("format", "")))
        naive_wall[idx[ok]] = ~np.asarray(fixed, dtype=bool)

    if fmt.ts_format is not None:
        attempt(~done, format=fmt.ts_format)
    attempt(~done, format="ISO8601")
    if fmt.ts_format is None and not done.all():
        first = next((v for v in values[~done] if _DATE_LIKE.search(v)), None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas warns about dayfirst while guessing
            guessed = None if first is None else guess_datetime_format(first, fmt.dayfirst)
        if guessed is not None:
            attempt(~done, format=guessed)
        _lenient(values, us, done, naive_wall, fmt)
    if naive_wall.any() and not fmt.is_utc:
        us[naive_wall] = _localize(us[naive_wall], fmt)
    return us, done & ~missing


def _lenient(values: Any, us: Ints, done: Mask, naive_wall: Mask, fmt: FileFormat) -> None:
    """Last resort, one row at a time over rows already known to be odd."""
    tried = hits = 0
    for i in np.flatnonzero(~done):
        value = values[i]
        if not _DATE_LIKE.search(value):
            continue
        if tried >= _LENIENT_PROBE and hits == 0:
            return  # nothing like a date so far: do not spend a parse on every junk row
        tried += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                stamp = pd.Timestamp(pd.to_datetime(value, dayfirst=fmt.dayfirst))
            except (ValueError, OverflowError, TypeError):
                continue
        if pd.isna(stamp):
            continue
        hits += 1
        naive_wall[i] = stamp.tzinfo is None
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        us[i] = int(stamp.asm8.astype("datetime64[us]").astype(np.int64))
        done[i] = True


def _stamp(us: int | None) -> pd.Timestamp | None:
    """A UTC timestamp from epoch microseconds (any year Arrow can hold)."""
    if us is None:
        return None
    return pd.Timestamp(np.datetime64(us, "us")).tz_localize("UTC")


def _has_zone(strftime: str) -> bool:
    return "%z" in strftime or "%Z" in strftime


def _epoch(seconds: npt.NDArray[np.float64]) -> tuple[Ints, Mask]:
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(seconds) & (seconds >= _EPOCH_RANGE[0]) & (seconds <= _EPOCH_RANGE[1])
    us = np.full(len(seconds), _NAT, dtype=np.int64)
    us[ok] = np.round(seconds[ok] * 1e6).astype(np.int64)
    return us, ok


def _localize(wall_us: Ints, fmt: FileFormat) -> Ints:
    """Wall-clock microseconds in ``fmt.timezone`` to UTC microseconds (NaT kept)."""
    if fmt.is_utc or len(wall_us) == 0:
        return wall_us
    index = pd.DatetimeIndex(wall_us.view("datetime64[us]"))
    local = index.tz_localize(
        fmt.timezone, ambiguous=np.ones(len(index), dtype=bool), nonexistent="shift_forward"
    )
    return _index_us(local)


def _us(parsed: Any) -> tuple[Ints, Mask]:
    us = _index_us(pd.DatetimeIndex(parsed))
    return us, us != _NAT


def _index_us(index: pd.DatetimeIndex) -> Ints:
    """Epoch microseconds (UTC for an aware index, wall time for a naive one); NaT kept."""
    return np.asarray(index.as_unit("us").values.view(np.int64), dtype=np.int64)


def _ts_array(us: Ints, ok: Mask) -> Any:
    return pa.array(us, type=TS_TYPE, mask=~ok)


def _missing(text: Any) -> Mask:
    return _mask(
        pc.or_kleene(pc.is_null(text), pc.is_in(pc.utf8_lower(text), pa.array(MISSING_TOKENS)))
    )


def _mask(array: Any) -> Mask:
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _floats(array: Any) -> npt.NDArray[np.float64]:
    return np.asarray(pc.fill_null(array, np.nan).to_numpy(zero_copy_only=False), dtype=np.float64)


def _ints(array: Any) -> Ints:
    return np.asarray(pc.fill_null(array, _NAT).to_numpy(zero_copy_only=False), dtype=np.int64)


def _any(array: Any) -> bool:
    return bool(pc.any(pc.fill_null(array, False)).as_py() or False)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
