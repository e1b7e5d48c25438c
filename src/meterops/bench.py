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


def bench_ingest(rows: int = 1_000_000, meters: int = 1_000) -> dict[str, Any]:
    """Run the ingest benchmark in a temporary project; returns the numbers."""
    from meterops.pipeline import Pipeline
    from meterops.sources.files import FileFormat, read_file
    from meterops.sources.replay import in_time_order, paced

    with tempfile.TemporaryDirectory(prefix="meterops-bench-") as tmp:
        root = Path(tmp)
        frame = synthetic_readings(rows, meters)
        csv = root / "readings.csv"
        frame.to_csv(csv, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
        settings = load_settings(
            None, project_dir=root, worker={"poll_timeout": 0.05, "batch_rows": 100_000}
        )
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
        ceiling = _sqlite_ceiling(frame, settings.worker.batch_rows, root / "ceiling.db")
    seconds = done - started
    rate = rows / seconds
    return {
        "benchmark": "ingest",
        "readings": rows,
        "meters": meters,
        "seconds": round(seconds, 3),
        "readings_per_s": round(rate),
        "ceiling_readings_per_s": round(ceiling),
        "ratio": round(rate / ceiling, 3),
        "stages_readings_per_s": {
            "parse": round(rows / (parsed - started)),
            "publish": round(rows / (published - parsed)),
            "worker": round(totals.rows / (done - published)),
        },
        "stored": stored,
        "lake_rows": lake_rows,
        "cores": os.cpu_count(),
        "pyarrow": pa.__version__,
        "sqlite": sqlite3.sqlite_version,
    }
