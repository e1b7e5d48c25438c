"""Benchmarks: each prints its own rate beside a ceiling or peer measured in the same run.

``ingest``: a CSV file of N readings goes replay -> bus -> one worker ->
store + lake on the embedded backends, timed end to end; the ceiling is the
raw rate of batched ``executemany`` inserts of the same rows, in the same
micro-batch size, into a bare SQLite table keyed by (meter, ts) with the same
pragmas. Timings use ``perf_counter``; nothing here asserts a number.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from meterops.settings import load_settings

__all__ = ["bench_ingest", "synthetic_readings"]


def synthetic_readings(rows: int, meters: int, seed: int = 0) -> pd.DataFrame:
    """``rows`` hourly readings spread over ``meters`` meters (fast, for benchmarks)."""
    rng = np.random.default_rng(seed)
    steps = -(-rows // meters)
    meter = np.tile(np.array([f"m-{i:05d}" for i in range(meters)]), steps)[:rows]
    hour = np.repeat(np.arange(steps), meters)[:rows]
    ts = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(hour, unit="h")
    value = np.round(rng.gamma(2.0, 0.5, rows), 4)
    return pd.DataFrame({"meter_id": meter, "ts": ts, "value": value})


def _sqlite_ceiling(frame: pd.DataFrame, batch_rows: int, path: Path) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE readings (meter_id TEXT NOT NULL, ts INTEGER NOT NULL, value REAL, "
        "PRIMARY KEY (meter_id, ts)) WITHOUT ROWID"
    )
    meter = frame["meter_id"].tolist()
    ts = (frame["ts"].astype("int64") // 1000).tolist()
    value = frame["value"].tolist()
    started = time.perf_counter()
    for i in range(0, len(frame), batch_rows):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO readings VALUES (?, ?, ?)",
            zip(
                meter[i : i + batch_rows],
                ts[i : i + batch_rows],
                value[i : i + batch_rows],
                strict=True,
            ),
        )
        conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    return len(frame) / seconds


def _pipeline_rate(
    root: Path, csv: Path, rows: int, backends: dict[str, str] | None = None
) -> dict[str, Any]:
    """Time file -> bus -> one worker -> store + lake in a fresh project under ``root``."""
    from meterops.pipeline import Pipeline
    from meterops.sources.files import FileFormat, read_file
    from meterops.sources.replay import in_time_order, paced

    overrides: dict[str, Any] = {"worker": {"poll_timeout": 0.05, "batch_rows": 100_000}}
    if backends:
        overrides["backends"] = backends
    settings = load_settings(None, project_dir=root, **overrides)
    with Pipeline(settings) as pipe:
        started = time.perf_counter()
        batch, _ = read_file(csv, FileFormat())
        batch = in_time_order(batch)
        parsed = time.perf_counter()
        for _ in pipe.publish(paced(batch, None, settings.source.chunk_rows)):
            pass
        published = time.perf_counter()
        totals = pipe.worker().run(until_idle=True)
        done = time.perf_counter() - settings.worker.poll_timeout  # the final idle poll
        stored = pipe.store.counts().readings
        lake_rows = pipe.lake.read().num_rows
    seconds = done - started
    return {
        "seconds": round(seconds, 3),
        "readings_per_s": round(rows / seconds),
        "stages_readings_per_s": {
            "parse": round(rows / (parsed - started)),
            "publish": round(rows / (published - parsed)),
            "worker": round(totals.rows / (done - published)),
        },
        "stored": stored,
        "lake_rows": lake_rows,
    }


def _ipc_payloads(frame: pd.DataFrame, rows_per_message: int) -> tuple[list[bytes], list[int]]:
    from meterops.types import ReadingBatch

    table = ReadingBatch.from_pandas(frame).table
    payloads, counts = [], []
    for start in range(0, table.num_rows, rows_per_message):
        chunk = table.slice(start, rows_per_message)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, chunk.schema) as writer:
            writer.write_table(chunk)
        payloads.append(bytes(sink.getvalue()))
        counts.append(chunk.num_rows)
    return payloads, counts


def _scaled(root: Path, csv: Path, frame: pd.DataFrame) -> dict[str, Any]:
    from meterops.services.kafka import produce_consume_ceiling
    from meterops.services.postgres import copy_ceiling
    from meterops.services.stack import scaled_stack

    with scaled_stack(root / "services") as urls:
        result = _pipeline_rate(root / "scaled", csv, len(frame), urls)
        bootstrap = urls["bus"].partition("://")[2].partition("?")[0]
        payloads, counts = _ipc_payloads(frame, 20_000)
        kafka = produce_consume_ceiling(bootstrap, payloads, counts)
        postgres = copy_ceiling(urls["store"], frame, 100_000)
    result["ceilings_readings_per_s"] = {
        "kafka_produce_consume": round(float(kafka["round_trip_rows_per_s"])),
        "postgres_copy": round(postgres),
    }
    return result


def bench_ingest(
    rows: int = 1_000_000, meters: int = 1_000, profile: str = "default"
) -> dict[str, Any]:
    """Run the ingest benchmark in temporary projects; returns the numbers.

    ``profile="scaled"`` also runs the pipeline on a real Kafka broker and
    PostgreSQL server started on loopback, with their raw rates as ceilings;
    the top-level ``readings_per_s``/``ceiling_readings_per_s``/``ratio`` then
    describe the scaled run (the slower service is the ceiling).
    """
    with tempfile.TemporaryDirectory(prefix="meterops-bench-") as tmp:
        root = Path(tmp)
        frame = synthetic_readings(rows, meters)
        csv = root / "readings.csv"
        frame.to_csv(csv, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
        embedded = _pipeline_rate(root / "embedded", csv, rows)
        embedded["ceiling_readings_per_s"] = round(
            _sqlite_ceiling(frame, 100_000, root / "ceiling.db")
        )
        embedded["ratio"] = round(
            embedded["readings_per_s"] / embedded["ceiling_readings_per_s"], 3
        )
        scaled = _scaled(root, csv, frame) if profile == "scaled" else None
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "profile": profile,
        "readings": rows,
        "meters": meters,
        **{k: embedded[k] for k in ("readings_per_s", "ceiling_readings_per_s", "ratio")},
        "embedded": embedded,
        "cores": os.cpu_count(),
        "pyarrow": pa.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
    if scaled is not None:
        ceiling = min(scaled["ceilings_readings_per_s"].values())
        scaled["ratios"] = {
            name: round(scaled["readings_per_s"] / value, 3)
            for name, value in scaled["ceilings_readings_per_s"].items()
        }
        result.update(
            readings_per_s=scaled["readings_per_s"],
            ceiling_readings_per_s=ceiling,
            ratio=round(scaled["readings_per_s"] / ceiling, 3),
            scaled=scaled,
        )
    return result
