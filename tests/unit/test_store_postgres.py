"""PostgreSQL store beyond the shared contract: faults, concurrency, migrations, COPY."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from meterops.errors import Unavailable
from meterops.services.base import Service, free_port
from meterops.services.postgres import PostgresService, copy_ceiling
from meterops.store.postgres import (
    BY_INDEX,
    FILL_ACTUALS,
    MIGRATIONS,
    STORED_VALUES,
    PostgresStore,
    copy_binary,
)
from meterops.types import DEADLETTER_SCHEMA, ReadingBatch
from tests.helpers import readings

pytestmark = pytest.mark.postgres

NO_DEAD = DEADLETTER_SCHEMA.empty_table()
ROOT = Path(__file__).resolve().parents[2]


def _scalar(url: str, sql: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_a_stopped_server_raises_unavailable_and_the_store_heals(
    postgres_service: Service, postgres_url: str
) -> None:
    first = readings(meters=3, steps=10)
    second = readings(meters=3, steps=10, start="2024-02-01")
    with PostgresStore(f"{postgres_url}?pool_timeout=2").open() as store:
        store.write(first, NO_DEAD, {"n": 1})
        postgres_service.stop()
        try:
            with pytest.raises(Unavailable) as info:
                store.write(second, NO_DEAD, {"n": 2})
            assert info.value.retry_after > 0
            with pytest.raises(Unavailable):
                store.counts()
        finally:
            postgres_service.start()
        retried = store.write(second, NO_DEAD, {"n": 2})  # the worker's retry
        assert retried.inserted == len(second)
        again = store.write(first, NO_DEAD, {"n": 1})  # an at-least-once redelivery
        assert again.inserted == 0 and again.duplicates == len(first)
        assert store.counts().readings == len(first) + len(second)
        assert len(store.readings()) == len(first) + len(second)
        # the failed write left no batch behind
        assert len(store.pending_lake_batches()) == 3


def test_a_restart_between_writes_is_invisible(
    postgres_service: Service, postgres_url: str
) -> None:
    with PostgresStore(postgres_url).open() as store:
        store.write(readings(meters=2, steps=5), NO_DEAD, {})
        postgres_service.restart()
        result = store.write(readings(meters=2, steps=5, start="2024-03-01"), NO_DEAD, {})
        assert result.inserted == 10
        assert store.counts().readings == 20


def test_a_dead_server_at_open_is_unavailable() -> None:
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x?pool_timeout=1")
    with pytest.raises(Unavailable, match="cannot connect"):
        store.open()
    store.close()


WRITER = """
import sys
import numpy as np, pandas as pd
from meterops.store.postgres import PostgresStore
from meterops.types import DEADLETTER_SCHEMA, ReadingBatch

url, prefix = sys.argv[1], sys.argv[2]
meters, steps, batches = 200, 100, 5
with PostgresStore(url).open() as store:
    for b in range(batches):
        ids = np.repeat([f"{prefix}-{i}" for i in range(meters)], steps)
        hours = np.tile(np.arange(steps) + b * steps, meters)
        frame = pd.DataFrame({
            "meter_id": ids,
            "ts": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(hours, "h"),
            "value": np.arange(meters * steps, dtype=float),
            "temperature": 1.5,
        })
        result = store.write(
            ReadingBatch.from_pandas(frame), DEADLETTER_SCHEMA.empty_table(), {"b": b}
        )
        assert result.inserted == meters * steps, result
"""


@pytest.mark.slow
def test_two_processes_writing_disjoint_meters_end_with_exact_counts(postgres_url: str) -> None:
    with PostgresStore(postgres_url).open():
        pass  # schema in place; the writers race on the covariate column instead
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, postgres_url, prefix],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for prefix in ("a", "b")
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    with PostgresStore(postgres_url).open() as store:
        counts = store.counts()
        assert counts.readings == 2 * 200 * 100 * 5
        assert counts.meters == 400
        assert len(store.pending_lake_batches()) == 10
        back = store.readings("b-7").to_pandas()
        assert len(back) == 500 and (back["temperature"] == 1.5).all()
        assert back["ts"].is_monotonic_increasing


def test_migrations_run_once_when_stores_open_at_the_same_time(postgres_url: str) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            store = PostgresStore(postgres_url)
            barrier.wait()
            with store.open() as opened:
                opened.counts()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _scalar(postgres_url, "SELECT count(*) FROM schema_version") == len(MIGRATIONS)
    assert _scalar(postgres_url, "SELECT max(version) FROM schema_version") == len(MIGRATIONS)


def test_binary_copy_round_trips_text_nulls_and_sliced_columns(postgres_url: str) -> None:
    import psycopg

    table = pa.table(
        {
            "meter_id": ["zähler-1", "m:2", "", "m.4"],
            "ts": pa.array([0, -1, 2**62, 5], pa.int64()),
            "value": pa.array([1.5, None, float("inf"), -0.0], pa.float64()),
        }
    ).slice(1)  # a non-zero Arrow offset
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE t (meter_id TEXT, ts BIGINT, value DOUBLE PRECISION)")
        with conn.cursor() as cur, cur.copy("COPY t FROM STDIN (FORMAT binary)") as copy:
            copy.write(copy_binary(table.columns))
        rows = conn.execute("SELECT meter_id, ts, value FROM t").fetchall()
    assert rows == [("m:2", -1, None), ("", 2**62, float("inf")), ("m.4", 5, -0.0)]


def test_copy_ceiling_reports_a_rate(postgres_url: str) -> None:
    frame = readings(meters=10, steps=100).to_pandas()
    assert copy_ceiling(postgres_url, frame, batch_rows=300) > 0


def test_readings_keep_exact_floats_and_unicode_meters(postgres_url: str) -> None:
    values = np.array([0.1, 1 / 3, 1e-300, -2.5e300, 123456789.123456789])
    frame = pd.DataFrame(
        {
            "meter_id": ["zähler", "m-1", "m-1", "m-2", "m-3"],
            "ts": pd.to_datetime([0, 1, 2, 3, 4], unit="us", utc=True),
            "value": values,
        }
    )
    batch = ReadingBatch.from_pandas(frame)
    with PostgresStore(postgres_url).open() as store:
        store.write(batch, NO_DEAD, {})
        back = store.readings()
    order = np.argsort(np.array(frame["meter_id"].str.encode("utf-8")), kind="stable")
    assert back.table.equals(batch.take(pa.array(order)).table)


def test_service_urls_and_databases(postgres_service: Service) -> None:
    assert isinstance(postgres_service, PostgresService)
    assert postgres_service.url.startswith("postgresql://postgres@127.0.0.1:")
    assert postgres_service.url.endswith("/meterops")
    url = postgres_service.create_database("t_extra_db")
    assert _scalar(url, "SELECT 1") == 1


def test_a_connection_killed_mid_write_leaves_nothing_behind(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = readings(meters=3, steps=10)
    second = readings(meters=3, steps=10, start="2024-02-01")
    with PostgresStore(postgres_url).open() as store:
        store.write(first, NO_DEAD, {})
        original = PostgresStore._insert_deadletters

        def die(conn: Any, dead: pa.Table) -> int:
            # the readings are in; the server drops the session before commit
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return 0

        monkeypatch.setattr(PostgresStore, "_insert_deadletters", staticmethod(die))
        with pytest.raises(Unavailable):
            store.write(second, NO_DEAD, {})
        monkeypatch.setattr(PostgresStore, "_insert_deadletters", staticmethod(original))
        assert store.counts().readings == len(first)
        assert len(store.readings()) == len(first)
        assert len(store.pending_lake_batches()) == 1
        assert store.write(second, NO_DEAD, {}).inserted == len(second)
        assert store.counts().readings == len(first) + len(second)


def test_the_actual_joins_probe_the_indexes(postgres_url: str) -> None:
    """The joins of a batch with the stored tables never scan a stored table."""
    import psycopg

    from meterops.store.base import Scored
    from meterops.types import ONLINE_METRIC_SCHEMA, PREDICTION_SCHEMA, SCORE_SCHEMA

    batch = readings(meters=20, steps=50)
    t = batch.table
    n = t.num_rows
    ts = t.column("ts").cast(pa.int64()).to_numpy()
    preds = pa.table(
        {
            "meter_id": t.column("meter_id"),
            "ts": t.column("ts"),
            "horizon": pa.array(np.ones(n, np.int32)),
            "target_ts": pa.array(ts + 3_600_000_000).cast(t.column("ts").type),
            **{q: t.column("value") for q in ("yhat", "q10", "q50", "q90")},
            "model": ["m"] * n,
            "source": ["r/0"] * n,
            "offset": np.arange(n),
            "scored_at": np.zeros(n, np.int64),
        },
        schema=PREDICTION_SCHEMA,
    )
    scored = Scored(preds, SCORE_SCHEMA.empty_table(), ONLINE_METRIC_SCHEMA.empty_table())
    with PostgresStore(postgres_url).open() as store:
        assert store.write(batch, NO_DEAD, {}, scored=scored).actuals == 20 * 49
    with psycopg.connect(postgres_url, autocommit=True) as conn, conn.transaction():
        conn.execute("ANALYZE")  # even with statistics saying the tables are small
        conn.execute(BY_INDEX)
        conn.execute("CREATE TEMP TABLE _r AS SELECT meter_id, ts, value FROM readings LIMIT 500")
        conn.execute("CREATE TEMP TABLE _q AS SELECT 0::bigint AS i, meter_id, ts FROM readings")
        probes = (
            (FILL_ACTUALS, "predictions_by_time_pkey", "(ts = w.ts) AND (meter_id = w.meter_id)"),
            (STORED_VALUES, "readings_pkey", "(meter_id = q.meter_id) AND (ts = q.ts)"),
        )
        for sql, index, key in probes:  # the whole key: no scan of a meter's or a time's rows
            plan = "\n".join(str(r[0]) for r in conn.execute(f"EXPLAIN {sql}").fetchall())
            assert f"Index Scan using {index}" in plan and f"Index Cond: ({key}" in plan, plan
            assert "Seq Scan on predictions" not in plan and "Seq Scan on readings" not in plan
