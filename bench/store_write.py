"""Store.write rates with and without what the stream scored, on SQLite and PostgreSQL.

Each batch is ``meters x steps`` new hourly readings plus, when scored, the
stream's output for them: two predictions per reading (horizons 1 and 24
steps), one anomaly score per reading, one online-metrics row and one 200 kB
checkpoint. The same batches are written to a fresh store twice, without and
with ``scored``, so the two rates compare directly. SQLite runs twice: rows
bound as whole columns (``sqlite``, the default) and value by value
(``sqlite-rows``, ``?bind=rows``), the baseline. PostgreSQL is started on
loopback the way the tests start it (installed on first use).

    .venv/bin/python bench/store_write.py                    # every backend
    .venv/bin/python bench/store_write.py sqlite --steps 100 # 100k-reading batches
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from meterops.store.base import Checkpoint, Scored, Store
from meterops.types import (
    DEADLETTER_SCHEMA,
    ONLINE_METRIC_SCHEMA,
    PREDICTION_SCHEMA,
    SCORE_SCHEMA,
    TS_TYPE,
    ReadingBatch,
)

HOUR_US = 3_600_000_000
START_US = 1_704_067_200_000_000  # 2024-01-01 UTC
NO_DEAD = DEADLETTER_SCHEMA.empty_table()


def batch(index: int, meters: int, steps: int) -> tuple[ReadingBatch, Scored]:
    rng = np.random.default_rng(index)
    ids = np.repeat([f"meter-{i:05d}" for i in range(meters)], steps)
    hours = np.tile(np.arange(steps) + index * steps, meters).astype(np.int64)
    ts = START_US + hours * HOUR_US
    value = rng.random(len(ids))
    n = len(ids)
    good = ReadingBatch(
        pa.table({"meter_id": ids, "ts": pa.array(ts).cast(TS_TYPE), "value": value})
    )
    horizon = np.repeat(np.array([1, 24], dtype=np.int32), n)
    yhat = np.tile(value, 2) + 0.1
    offsets = np.arange(n) + index * n
    predictions = pa.table(
        {
            "meter_id": np.tile(ids, 2),
            "ts": pa.array(np.tile(ts, 2)).cast(TS_TYPE),
            "horizon": pa.array(horizon, pa.int32()),
            "target_ts": pa.array(np.tile(ts, 2) + horizon.astype(np.int64) * HOUR_US).cast(
                TS_TYPE
            ),
            "yhat": yhat,
            "q10": yhat - 0.2,
            "q50": yhat,
            "q90": yhat + 0.2,
            "model": ["gbm/3"] * (2 * n),
            "source": ["readings/0"] * (2 * n),
            "offset": np.tile(offsets, 2),
            "scored_at": np.full(2 * n, START_US),
        },
        schema=PREDICTION_SCHEMA,
    )
    scores = pa.table(
        {
            "meter_id": ids,
            "ts": pa.array(ts).cast(TS_TYPE),
            "value": value,
            "expected": value + 0.1,
            "sigma": np.full(n, 0.2),
            "score": rng.random(n),
            "is_anomaly": rng.random(n) < 0.01,
            "model": ["gbm/3"] * n,
            "source": ["readings/0"] * n,
            "offset": offsets,
            "scored_at": np.full(n, START_US),
        },
        schema=SCORE_SCHEMA,
    )
    metrics = pa.table(
        {
            "model": ["sgd"],
            "source": ["readings/0"],
            "offset": [int(offsets[0])],
            "recorded_at": [START_US],
            "n": [n],
            "sse": [1.0],
            "sae": [1.0],
            "persistence_sse": [1.0],
            "persistence_sae": [1.0],
        },
        schema=ONLINE_METRIC_SCHEMA,
    )
    state = (Checkpoint("online", bytes(200_000), {"readings/0": int(offsets[-1]) + 1}),)
    return good, Scored(predictions, scores, metrics, state)


def run(
    label: str, make_store: Callable[[], Store], batches: list[tuple[ReadingBatch, Scored]]
) -> None:
    readings = sum(len(good) for good, _ in batches)
    scored_rows = sum(s.predictions.num_rows + s.scores.num_rows for _, s in batches)
    for with_scored in (False, True):
        with make_store().open() as store:
            wall, cpu = time.perf_counter(), time.process_time()
            for good, scored in batches:
                store.write(good, NO_DEAD, {}, scored=scored if with_scored else None)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows = readings + (scored_rows if with_scored else 0)
        print(
            f"{label:11s} scored={'yes' if with_scored else 'no ':3s} "
            f"{readings / wall:9,.0f} readings/s  {rows / wall:9,.0f} rows/s  "
            f"{1000 * wall / len(batches):7.1f} ms/batch wall, "
            f"{1000 * cpu / len(batches):7.1f} ms/batch CPU of this process",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backends", nargs="*", default=["sqlite", "sqlite-rows", "postgres"])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10, help="readings per meter per batch")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    batches = [batch(i, args.meters, args.steps) for i in range(args.batches)]
    print(
        f"{args.batches} batches of {args.meters * args.steps:,} readings "
        f"({args.meters} meters x {args.steps} steps); scored adds 3 rows per reading"
    )
    tmp = Path(tempfile.mkdtemp(prefix="meterops-bench-"))
    names = iter(range(1_000))
    for label, columns in (("sqlite", True), ("sqlite-rows", False)):
        if label in args.backends:
            from meterops.store.sqlite import SQLiteStore

            run(
                label,
                lambda columns=columns: SQLiteStore(str(tmp / f"s{next(names)}.db"), columns),
                batches,
            )
    if "postgres" in args.backends:
        from meterops.services.postgres import PostgresService
        from meterops.store.postgres import PostgresStore

        service = PostgresService(tmp / "postgres")
        service.install()
        with service:
            run(
                "postgres",
                lambda: PostgresStore(service.create_database(f"bench{next(names)}")),
                batches,
            )


if __name__ == "__main__":
    main()
