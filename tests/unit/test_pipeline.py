"""The worker loop in one process: validate, store, lake, commit, and recovery."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pyarrow as pa
import pytest

import meterops.pipeline as pipeline_module
from meterops.bus.base import READINGS
from meterops.errors import Unavailable
from meterops.pipeline import Pipeline
from meterops.settings import Settings
from meterops.types import DEADLETTER_SCHEMA, ReadingBatch
from tests.helpers import readings


def with_bad_rows() -> ReadingBatch:
    good = readings(meters=3, steps=5)
    bad = ReadingBatch.from_pandas(
        pd.DataFrame(
            {
                "meter_id": ["m-0", "m-1", "", "m-2"],
                "ts": ["2024-01-02T00:00Z"] * 4,
                "value": [float("inf"), 1e12, 1.0, float("-inf")],
            }
        )
    )
    return ReadingBatch.concat([good, bad])


def test_worker_stores_good_rows_and_dead_letters_bad_ones(settings: Settings) -> None:
    with Pipeline(settings) as pipe:
        list(pipe.publish([with_bad_rows()]))
        totals = pipe.worker().run(until_idle=True)
        status = pipe.status()
        lake = pipe.lake.read()
    assert totals.rows == 19 and totals.stored == 15 and totals.deadletters == 4
    assert status["readings"] == 15 and status["lag"] == 0
    assert status["deadletters_by_reason"] == {
        "non-finite value": 2,
        "value out of range": 1,
        "missing meter_id": 1,
    }
    assert lake.num_rows == 15
    assert set(lake.column_names) >= {"meter_id", "ts", "value", "date"}


def test_redelivered_messages_change_nothing(settings: Settings) -> None:
    with Pipeline(settings) as pipe:
        list(pipe.publish([with_bad_rows()]))
        consumer = pipe.bus.consumer("other", [READINGS])
        messages = consumer.poll(1000, 0.5)
        consumer.close()
        worker = pipe.worker()
        first = worker.process(messages)
        again = worker.process(messages)  # crashed before commit: same messages again
        assert (first.stored, first.deadletters) == (15, 4)
        assert (again.stored, again.deadletters, again.duplicates) == (0, 0, 15)
        assert pipe.status()["readings"] == 15 and pipe.status()["deadletters"] == 4
        assert pipe.lake.read().num_rows == 15


def test_a_batch_stored_but_not_exported_is_finished_by_the_next_worker(
    settings: Settings,
) -> None:
    with Pipeline(settings) as pipe:
        result = pipe.store.write(readings(meters=2, steps=3), DEADLETTER_SCHEMA.empty_table(), {})
        assert pipe.store.pending_lake_batches() == [result.batch_id]
        pipe.worker().run(until_idle=True)  # nothing on the bus, but the export is finished
        assert pipe.store.pending_lake_batches() == []
        assert pipe.lake.read().num_rows == 6


def test_dead_letters_replay_after_the_rules_change(
    make_settings: Callable[..., Settings],
) -> None:
    strict = make_settings(worker={"poll_timeout": 0.05})
    with Pipeline(strict) as pipe:
        list(pipe.publish([with_bad_rows()]))
        pipe.worker().run(until_idle=True)
    loose = make_settings(worker={"poll_timeout": 0.05}, validation={"value_max": 1e13})
    with Pipeline(loose) as pipe:
        assert pipe.replay_deadletters(reason="value out of range") == 1
        pipe.worker().run(until_idle=True)
        status = pipe.status()
        assert status["readings"] == 16
        assert len(pipe.store.deadletters()) == 3  # the replayed one is flagged
        assert len(pipe.store.deadletters(replayed=True)) == 4


def test_lake_is_readable_by_duckdb_polars_and_pandas(settings: Settings) -> None:
    import duckdb
    import polars as pl

    with Pipeline(settings) as pipe:
        list(pipe.publish([readings(meters=4, steps=30)]))
        pipe.worker().run(until_idle=True)
        root = pipe.lake.dataset_path
    pattern = f"{root}/**/*.parquet"
    assert duckdb.sql(
        f"SELECT count(*), count(DISTINCT meter_id) FROM read_parquet('{pattern}', "  # noqa: S608
        "hive_partitioning=true)"
    ).fetchall() == [(120, 4)]
    frame = pl.scan_parquet(pattern, hive_partitioning=True).collect()
    assert frame.height == 120 and frame["date"].n_unique() == 2
    assert len(pd.read_parquet(root)) == 120
    assert pa.types.is_timestamp(
        pl.scan_parquet(pattern).collect().to_arrow().schema.field("ts").type
    )


class FlakyStore:
    """A store whose writes fail as if the server were down, ``budget["left"]`` times.

    The budget is shared by every store the pipeline opens: the worker's own
    and its writer thread's.
    """

    def __init__(self, inner: object, budget: dict[str, int]) -> None:
        self.inner = inner
        self.budget = budget

    def open(self) -> FlakyStore:
        self.inner.open()  # type: ignore[attr-defined]
        return self

    def write(self, *args: object, **kwargs: object) -> object:
        if self.budget["left"]:
            self.budget["left"] -= 1
            raise Unavailable("connection refused (test)", retry_after=0.01)
        return self.inner.write(*args, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def flaky_stores(monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
    budget = {"left": failures}
    real = pipeline_module.make_store
    monkeypatch.setattr(pipeline_module, "make_store", lambda s: FlakyStore(real(s), budget))


def test_an_unavailable_store_is_retried_with_backoff_and_nothing_is_lost(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky_stores(monkeypatch, failures=3)
    with Pipeline(settings) as pipe:
        list(pipe.publish([readings(meters=5, steps=10)]))
        worker = pipe.worker()
        totals = worker.run(until_idle=True)
        assert worker.retries == 3
        assert totals.stored == 50 and pipe.status()["readings"] == 50
        assert pipe.status()["lag"] == 0


def test_the_worker_gives_up_after_retry_for(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(worker={"poll_timeout": 0.05, "retry_for": 0.2})
    flaky_stores(monkeypatch, failures=1000)
    with Pipeline(settings) as pipe:
        list(pipe.publish([readings(meters=1, steps=2)]))
        with pytest.raises(Unavailable):
            pipe.worker().run(until_idle=True)
        assert pipe.status()["lag"] == 2  # nothing committed: it will be redelivered
