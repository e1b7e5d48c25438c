"""Why the stream tables are keyed time first: SQLite insert cost per row, both key orders.

A scored micro-batch holds a few time steps of every meter. Keyed meter
first, its rows land on a page per meter; keyed time first, they are
neighbours. This inserts prediction-shaped rows (the ``predictions`` table's
columns and its ``target_ts`` index) for 1,000 meters after 24 stored steps,
in batches of 1 and of 71 steps, and prints microseconds per row for each
key order. Run: ``python bench/store_keys.py``.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

METERS = [f"meter-{i:04d}" for i in range(1000)]
HOUR_US = 3_600_000_000
COLUMNS = (
    "meter_id TEXT NOT NULL, ts INT NOT NULL, horizon INT NOT NULL, target_ts INT NOT NULL, "
    "yhat REAL, q10 REAL, q50 REAL, q90 REAL, model TEXT, source TEXT, off INT, "
    "scored_at INT, actual REAL"
)
KEYS = {"meter first": "meter_id, ts, horizon", "time first": "ts, meter_id, horizon"}
TARGET_INDEX = {"meter first": "meter_id, target_ts", "time first": "target_ts, meter_id"}


def _rows(first: int, last: int, order: str) -> list[tuple[Any, ...]]:
    rows = [
        (m, s * HOUR_US, h, (s + h) * HOUR_US, 1.0, 0.5, 1.0, 1.5, "m/1", "readings/0", s, 0, None)
        for s in range(first, last)
        for m in METERS
        for h in (1, 24)
    ]
    if order == "meter first":
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return rows  # built in time order already


def per_row_us(order: str, steps: int, batches: int, history: int = 24) -> float:
    """Median microseconds per row of ``batches`` inserts of ``steps`` time steps each."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "keys.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"CREATE TABLE p ({COLUMNS}, PRIMARY KEY ({KEYS[order]})) WITHOUT ROWID")
        conn.execute(f"CREATE INDEX p_target ON p ({TARGET_INDEX[order]})")
        insert = "INSERT INTO p VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
        conn.execute("BEGIN")
        conn.executemany(insert, _rows(0, history, order))
        conn.execute("COMMIT")
        times = []
        for b in range(batches):
            rows = _rows(history + b * steps, history + (b + 1) * steps, order)
            started = time.perf_counter()
            conn.execute("BEGIN")
            conn.executemany(insert, rows)
            conn.execute("COMMIT")
            times.append((time.perf_counter() - started) / len(rows))
        conn.close()
    return float(np.median(times)) * 1e6


def main() -> None:
    print(f"{'key order':<12} {'steps/batch':>11} {'us/row':>8}")
    for order in KEYS:
        for steps, batches in ((1, 20), (71, 3)):
            print(f"{order:<12} {steps:>11} {per_row_us(order, steps, batches):>8.2f}")


if __name__ == "__main__":
    main()
