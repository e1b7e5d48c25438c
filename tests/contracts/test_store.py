"""The store contract: every backend passes these unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from meterops.store.base import DUPLICATE_REASON, Store
from meterops.types import DEADLETTER_SCHEMA, ReadingBatch
from tests.helpers import readings

NO_DEAD = DEADLETTER_SCHEMA.empty_table()


def dead(n: int, reason: str = "non-finite value", source: str = "readings/0") -> pa.Table:
    return pa.table(
        {
            "source": [source] * n,
            "offset": list(range(n)),
            "meter_id": ["m-x"] * n,
            "ts": ["2024-01-01T00:00:00Z"] * n,
            "value": ["inf"] * n,
            "reason": [reason] * n,
            "raw": [None] * n,
        },
        schema=DEADLETTER_SCHEMA,
    )


def origins(batch: ReadingBatch, source: str = "readings/1") -> pa.Table:
    return pa.table({"source": [source] * len(batch), "offset": np.arange(len(batch))})


class TestStoreContract:
    def test_round_trip_keeps_values_covariates_and_order(self, store: Store) -> None:
        batch = readings(meters=2, steps=3, temperature=[1.0, None, 3.0, 4.0, 5.0, -6.5])
        result = store.write(batch, NO_DEAD, {"offsets": {}})
        assert result.inserted == 6 and result.duplicates == 0 and result.new_mask.all()
        back = store.readings()
        assert back.table.equals(batch.table)
        assert store.counts().readings == 6 and store.counts().meters == 2

    def test_the_same_batch_twice_is_stored_once(self, store: Store) -> None:
        batch = readings(meters=3, steps=4)
        store.write(batch, NO_DEAD, {})
        again = store.write(batch, NO_DEAD, {})
        assert again.inserted == 0 and again.duplicates == len(batch)
        assert not again.new_mask.any()
        assert store.counts().readings == len(batch)

    def test_a_different_value_for_a_stored_key_is_dead_lettered_once(self, store: Store) -> None:
        batch = readings(meters=1, steps=3)
        store.write(batch, NO_DEAD, {})
        changed = ReadingBatch(batch.table.set_column(2, "value", pa.array([9.0, 9.0, 9.0]))).take(
            pa.array([1])
        )
        first = store.write(changed, NO_DEAD, {}, origins(changed))
        second = store.write(changed, NO_DEAD, {}, origins(changed))  # redelivery
        assert first.deadletters == 1 and second.deadletters == 0
        letters = store.deadletters()
        assert letters["reason"].tolist() == [DUPLICATE_REASON]
        assert letters["value"].tolist() == ["9.0"]
        assert store.readings().table.column("value").to_pylist() == (
            batch.table.column("value").to_pylist()
        )

    def test_dead_letters_are_unique_by_source_offset_and_counted(self, store: Store) -> None:
        store.write(ReadingBatch.empty(), dead(3), {})
        store.write(ReadingBatch.empty(), dead(3), {})
        store.write(ReadingBatch.empty(), dead(2, "value out of range", "readings/1"), {})
        counts = store.counts()
        assert counts.deadletters == 5
        assert counts.deadletters_by_reason == {"non-finite value": 3, "value out of range": 2}
        only = store.deadletters(reason="value out of range")
        assert len(only) == 2 and set(only["source"]) == {"readings/1"}
        assert len(store.deadletters(limit=1)) == 1

    def test_replayed_dead_letters_are_hidden_unless_asked(self, store: Store) -> None:
        store.write(ReadingBatch.empty(), dead(3), {})
        ids = store.deadletters()["id"].tolist()
        assert store.mark_replayed(ids[:2]) == 2
        assert store.mark_replayed(ids[:2]) == 0
        assert len(store.deadletters()) == 1
        assert len(store.deadletters(replayed=True)) == 3

    def test_range_queries_per_meter_with_exclusive_end(self, store: Store) -> None:
        store.write(readings(meters=3, steps=10), NO_DEAD, {})
        start = pd.Timestamp("2024-01-01 02:00", tz="UTC")
        end = pd.Timestamp("2024-01-01 05:00", tz="UTC")
        got = store.readings("m-1", start, end).to_pandas()
        assert got["meter_id"].unique().tolist() == ["m-1"]
        assert got["ts"].tolist() == list(pd.date_range(start, end, freq="h", inclusive="left"))
        assert len(store.readings("nope")) == 0

    def test_lake_outbox_tracks_batches_until_done(self, store: Store) -> None:
        first = store.write(readings(meters=2, steps=2), NO_DEAD, {"offsets": {"r/0": [0, 4]}})
        batch = readings(meters=2, steps=3)
        second = store.write(batch, NO_DEAD, {})
        assert store.pending_lake_batches() == [first.batch_id, second.batch_id]
        assert len(store.batch_readings(second.batch_id)) == 2  # only the new rows
        store.lake_done(first.batch_id)
        assert store.pending_lake_batches() == [second.batch_id]

    def test_meters_and_registration(self, store: Store) -> None:
        store.register_meters(["m-0", "m-9"])
        store.write(readings(meters=2, steps=5), NO_DEAD, {})
        meters = store.meters().set_index("meter_id")
        assert meters.loc["m-0", "readings"] == 5 and meters.loc["m-0", "registered"]
        assert not meters.loc["m-1", "registered"]
        assert meters.loc["m-1", "last_ts"] == pd.Timestamp("2024-01-01 04:00", tz="UTC")
        assert store.registered_meters() == {"m-0", "m-9"}
        assert store.counts().meters == 2  # m-9 has no readings yet

    def test_new_covariates_extend_the_schema(self, store: Store) -> None:
        store.write(readings(meters=1, steps=2), NO_DEAD, {})
        store.write(readings(meters=1, steps=2, start="2024-02-01", humidity=0.5), NO_DEAD, {})
        back = store.readings().to_pandas()
        assert back["humidity"].isna().sum() == 2 and (back["humidity"] == 0.5).sum() == 2
