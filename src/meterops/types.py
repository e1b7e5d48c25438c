"""The record types that travel through every stage, free of any backend.

A :class:`ReadingBatch` is an Arrow table with the reading schema: ``meter_id``
(string), ``ts`` (UTC microseconds), ``value`` (float64, null = missing), then
any numeric covariates (float64). Parsers may add two private columns for rows
they already know are bad: ``_reject`` (the reason) and ``_raw`` (the original
text, so a dead letter can be replayed after a fix). Everything downstream
moves whole batches; nothing iterates readings one Python object at a time.

>>> import pandas as pd
>>> b = ReadingBatch.from_pandas(pd.DataFrame(
...     {"meter_id": ["a", "b"], "ts": ["2024-01-01T00:00Z"] * 2, "value": [1.0, None]}))
>>> len(b), b.covariates
(2, ())
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "DEADLETTER_SCHEMA",
    "KEY_COLUMNS",
    "ONLINE_METRIC_SCHEMA",
    "PREDICTION_SCHEMA",
    "RAW",
    "REJECT",
    "SCORE_SCHEMA",
    "TS_TYPE",
    "Message",
    "ReadingBatch",
    "deadletter_table",
    "iso_text",
    "schema_for",
]

TS_TYPE = pa.timestamp("us", tz="UTC")
KEY_COLUMNS = ("meter_id", "ts")
BASE_FIELDS = (
    pa.field("meter_id", pa.string()),
    pa.field("ts", TS_TYPE),
    pa.field("value", pa.float64()),
)
REJECT = "_reject"
RAW = "_raw"
PRIVATE = (REJECT, RAW)

DEADLETTER_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("meter_id", pa.string()),
        pa.field("ts", pa.string()),
        pa.field("value", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.string()),
    ]
)

#: One forecast issued by the stream: made when reading ``(meter_id, ts)`` was
#: scored, for ``target_ts = ts + horizon`` steps; ``model`` names the model
#: version that made it (lineage with ``source``/``offset``: the reading's bus
#: position); ``scored_at`` is the wall clock in microseconds since the epoch.
#: Key: ``(meter_id, ts, horizon)``.
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("meter_id", pa.string()),
        pa.field("ts", TS_TYPE),
        pa.field("horizon", pa.int32()),
        pa.field("target_ts", TS_TYPE),
        pa.field("yhat", pa.float64()),
        pa.field("q10", pa.float64()),
        pa.field("q50", pa.float64()),
        pa.field("q90", pa.float64()),
        pa.field("model", pa.string()),
        pa.field("source", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("scored_at", pa.int64()),
    ]
)

#: The anomaly verdict on one reading (key ``(meter_id, ts)``): ``expected`` is
#: the one-step forecast made for it, ``score`` in [0, 1].
SCORE_SCHEMA = pa.schema(
    [
        pa.field("meter_id", pa.string()),
        pa.field("ts", TS_TYPE),
        pa.field("value", pa.float64()),
        pa.field("expected", pa.float64()),
        pa.field("sigma", pa.float64()),
        pa.field("score", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("model", pa.string()),
        pa.field("source", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("scored_at", pa.int64()),
    ]
)

#: Prequential metrics of the online model for one micro-batch of one
#: partition (key ``(model, source, offset)``: the first bus offset of the
#: batch), as sums so they aggregate exactly over any span.
ONLINE_METRIC_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("source", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("recorded_at", pa.int64()),
        pa.field("n", pa.int64()),
        pa.field("sse", pa.float64()),
        pa.field("sae", pa.float64()),
        pa.field("persistence_sse", pa.float64()),
        pa.field("persistence_sae", pa.float64()),
    ]
)


@dataclass(frozen=True)
class ReadingBatch:
    """An immutable columnar batch of readings (see the module docstring)."""

    table: pa.Table

    def __post_init__(self) -> None:
        names = self.table.column_names
        if tuple(names[:3]) != ("meter_id", "ts", "value"):
            raise ValueError(f"a reading batch starts with meter_id, ts, value; got {names[:3]}")

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def covariates(self) -> tuple[str, ...]:
        """Names of the numeric covariate columns, in order."""
        return tuple(n for n in self.table.column_names[3:] if n not in PRIVATE)

    @property
    def has_rejects(self) -> bool:
        return REJECT in self.table.column_names

    @classmethod
    def empty(cls, covariates: Sequence[str] = ()) -> ReadingBatch:
        return cls(schema_for(covariates).empty_table())

    @classmethod
    def from_pandas(cls, frame: pd.DataFrame) -> ReadingBatch:
        """Build a batch from a frame with ``meter_id``, ``ts``, ``value`` and covariates.

        Timestamps may be strings, naive (taken as UTC) or zone-aware values.
        NaN means missing here, as everywhere in pandas; parsers that must keep
        a literal "nan" apart from an empty cell build the Arrow table directly.
        """
        ts = pd.to_datetime(frame["ts"], utc=True)
        columns: dict[str, pa.Array] = {
            "meter_id": pa.array(frame["meter_id"].astype("string"), pa.string()),
            "ts": pa.array(ts.dt.tz_convert("UTC"), TS_TYPE),
            "value": pa.array(pd.to_numeric(frame["value"]), pa.float64()),
        }
        for name in frame.columns:
            if name in ("meter_id", "ts", "value"):
                continue
            if name in PRIVATE:
                columns[name] = pa.array(frame[name], pa.string())
            else:
                columns[name] = pa.array(pd.to_numeric(frame[name]), pa.float64())
        return cls(pa.table(columns))

    def to_pandas(self) -> pd.DataFrame:
        frame: pd.DataFrame = self.table.to_pandas()
        return frame

    def clean(self) -> ReadingBatch:
        """The same rows without the private parser columns."""
        drop = [c for c in PRIVATE if c in self.table.column_names]
        return ReadingBatch(self.table.drop_columns(drop)) if drop else self

    def take(self, indices: np.ndarray | pa.Array) -> ReadingBatch:
        return ReadingBatch(self.table.take(indices))

    def filter(self, mask: np.ndarray | pa.Array) -> ReadingBatch:
        return ReadingBatch(self.table.filter(mask))

    @staticmethod
    def concat(batches: Iterable[ReadingBatch]) -> ReadingBatch:
        """Concatenate batches whose covariates may differ (missing ones become null)."""
        tables = [b.table for b in batches]
        if not tables:
            return ReadingBatch.empty()
        return ReadingBatch(pa.concat_tables(tables, promote_options="permissive"))


def schema_for(covariates: Sequence[str] = ()) -> pa.Schema:
    """The reading schema with the given covariate columns."""
    return pa.schema([*BASE_FIELDS, *(pa.field(c, pa.float64()) for c in covariates)])


ROWS_PER_MESSAGE_BITS = 24  # rows of one message a message-numbered log can tell apart


@dataclass(frozen=True)
class Message:
    """One delivery from a bus: an Arrow table at ``offset`` in ``topic``/``partition``.

    Committing ``next_offset`` acknowledges the whole message. Logs differ in
    what an offset counts: the embedded log numbers rows (``next_offset`` =
    ``offset + rows``), Kafka numbers messages (``next_offset`` = ``offset + 1``).
    ``row_offsets`` gives every row a position unique within the partition
    either way (for Kafka: message offset x 2**24 + row index); dead letters
    are keyed by it so a redelivered message never records them twice.
    """

    topic: str
    partition: int
    offset: int
    table: pa.Table
    rows_numbered: bool = True

    def __len__(self) -> int:
        return int(self.table.num_rows)

    @property
    def next_offset(self) -> int:
        return self.offset + (int(self.table.num_rows) if self.rows_numbered else 1)

    def row_offsets(self) -> np.ndarray:
        n = int(self.table.num_rows)
        first = self.offset if self.rows_numbered else self.offset << ROWS_PER_MESSAGE_BITS
        return np.arange(first, first + n, dtype=np.int64)

    @property
    def batch(self) -> ReadingBatch:
        """The message as readings (for the ``readings`` topic)."""
        return ReadingBatch(self.table)


def iso_text(ts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """ISO-8601 UTC text of timestamps (Arrow's ``%S`` carries the microseconds)."""
    return pc.strftime(ts, format="%Y-%m-%dT%H:%M:%SZ")


def _printable(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return pc.replace_substring(text, "\x00", "\\x00")


def deadletter_table(
    batch: ReadingBatch,
    reasons: np.ndarray,
    sources: np.ndarray,
    offsets: np.ndarray,
) -> pa.Table:
    """Dead-letter rows for the rejected rows of ``batch``.

    ``reasons``, ``sources`` and ``offsets`` are aligned with the batch rows;
    timestamps and values are kept as text so that an unparseable input can be
    shown and replayed exactly as it came. NUL characters, which no SQL text
    column accepts, are written as the four characters ``\\x00``.
    """
    t = batch.table
    ts_text = iso_text(t.column("ts"))
    value_text = t.column("value").cast(pa.string())
    raw = t.column(RAW) if RAW in t.column_names else pa.nulls(t.num_rows, pa.string())
    return pa.table(
        {
            "source": pa.array(sources, pa.string()),
            "offset": pa.array(offsets, pa.int64()),
            "meter_id": _printable(t.column("meter_id")),
            "ts": ts_text,
            "value": value_text,
            "reason": pa.array(reasons, pa.string()),
            "raw": _printable(raw),
        },
        schema=DEADLETTER_SCHEMA,
    )
