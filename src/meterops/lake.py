"""The lake: readings as a Parquet dataset partitioned by UTC date (Hive style).

``<root>/readings/date=YYYY-MM-DD/batch-<id>-<n>.parquet``: one file per
ingest batch and date. File names derive from the store's batch id, so
re-exporting a batch after a crash overwrites the same files instead of
duplicating rows. DuckDB (``read_parquet('<root>/readings/**/*.parquet',
hive_partitioning=true)``), Polars and pandas read it directly. The root is any
fsspec URL (``file://``, ``s3://``, ...); plain paths are local.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from meterops.errors import BackendError, MissingDependency
from meterops.types import ReadingBatch

__all__ = ["Lake"]

_PARTITIONING = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


class Lake:
    """Writer and reader of the readings dataset (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._fs: pafs.FileSystem | None = None
        self._root = ""

    def open(self) -> Lake:
        scheme, sep, rest = self.url.partition("://")
        try:
            if not sep or scheme == "file":
                self._fs = pafs.LocalFileSystem()
                self._root = rest if sep else self.url
            else:
                try:
                    import fsspec
                except ImportError as exc:  # pragma: no cover - fsspec is a dependency
                    raise MissingDependency("fsspec", "lake") from exc
                fs, path = fsspec.core.url_to_fs(self.url)
                self._fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
                self._root = path
            self._fs.create_dir(self.dataset_path, recursive=True)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot open the lake at {self.url}: {exc}") from exc
        return self

    def close(self) -> None:
        self._fs = None

    @property
    def dataset_path(self) -> str:
        return f"{self._root.rstrip('/')}/readings"

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            raise BackendError("the lake is not open: call open() first")
        return self._fs

    def write(self, batch: ReadingBatch, batch_id: int) -> int:
        """Write the rows of one ingest batch; idempotent per ``batch_id``."""
        if len(batch) == 0:
            return 0
        table = batch.clean().table
        day = pc.strftime(table.column("ts"), format="%Y-%m-%d")
        table = table.append_column("date", day)
        try:
            ds.write_dataset(
                table,
                self.dataset_path,
                format="parquet",
                partitioning=_PARTITIONING,
                basename_template=f"batch-{batch_id:012d}-{{i}}.parquet",
                existing_data_behavior="overwrite_or_ignore",
                filesystem=self.fs,
                create_dir=True,
            )
        except (OSError, pa.ArrowException) as exc:
            raise BackendError(f"lake write failed for batch {batch_id}: {exc}") from exc
        return len(batch)

    def read(
        self,
        start: pd.Timestamp | None = None,
        end: pd.Timestamp | None = None,
        **filters: Any,
    ) -> pa.Table:
        """Readings in ``[start, end)``, all covariates unified across files."""
        dataset = ds.dataset(
            self.dataset_path, format="parquet", partitioning="hive", filesystem=self.fs
        )
        fragments = list(dataset.get_fragments())
        if not fragments:
            return pa.table({})
        schema = pa.unify_schemas([f.physical_schema for f in fragments])
        schema = schema.append(pa.field("date", pa.string()))
        dataset = ds.dataset(
            self.dataset_path,
            format="parquet",
            partitioning=_PARTITIONING,
            filesystem=self.fs,
            schema=schema,
        )
        expr = None
        if start is not None:
            expr = ds.field("ts") >= pa.scalar(pd.Timestamp(start), pa.timestamp("us", "UTC"))
        if end is not None:
            cond = ds.field("ts") < pa.scalar(pd.Timestamp(end), pa.timestamp("us", "UTC"))
            expr = cond if expr is None else expr & cond
        for name, value in filters.items():
            cond = ds.field(name) == value
            expr = cond if expr is None else expr & cond
        return dataset.to_table(filter=expr)
