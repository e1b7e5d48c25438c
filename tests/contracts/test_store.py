"""The store contract: every backend passes these unchanged."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from meterops.backends import make_store
from meterops.settings import load_settings
from meterops.store._sql import POSTGRES, SQLITE, migrations, statements
from meterops.store.base import DUPLICATE_REASON, Checkpoint, Scored, Store
from meterops.types import (
    DEADLETTER_SCHEMA,
    ONLINE_METRIC_SCHEMA,
    PREDICTION_SCHEMA,
    SCORE_SCHEMA,
    ReadingBatch,
)
from tests.contracts.conftest import STORES, store_url
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


# -- what the stream scored -----------------------------------------------------
V1 = "forecaster/1"
HOUR_US = 3_600_000_000


def predictions_for(
    batch: ReadingBatch,
    horizons: tuple[int, ...] = (1, 2),
    model: str = V1,
    source: str = "readings/0",
) -> pa.Table:
    """One prediction per reading and horizon (hourly steps): yhat = value + horizon / 10."""
    t = batch.table
    n = t.num_rows
    ts = t.column("ts").cast(pa.int64()).to_numpy()
    value = t.column("value").to_numpy(zero_copy_only=False)
    h = np.repeat(np.array(horizons, dtype=np.int32), n)
    yhat = np.tile(value, len(horizons)) + h / 10
    return pa.table(
        {
            "meter_id": pa.concat_arrays([t.column("meter_id").combine_chunks()] * len(horizons)),
            "ts": pa.array(np.tile(ts, len(horizons))).cast(PREDICTION_SCHEMA.field("ts").type),
            "horizon": pa.array(h, pa.int32()),
            "target_ts": pa.array(np.tile(ts, len(horizons)) + h.astype(np.int64) * HOUR_US).cast(
                PREDICTION_SCHEMA.field("target_ts").type
            ),
            "yhat": yhat,
            "q10": yhat - 0.25,
            "q50": yhat,
            "q90": yhat + 0.25,
            "model": [model] * (n * len(horizons)),
            "source": [source] * (n * len(horizons)),
            "offset": np.tile(np.arange(n), len(horizons)),
            "scored_at": np.full(n * len(horizons), 1_700_000_000_000_000),
        },
        schema=PREDICTION_SCHEMA,
    )


def scores_for(batch: ReadingBatch, anomalous: list[bool], model: str = V1) -> pa.Table:
    t = batch.table
    n = t.num_rows
    return pa.table(
        {
            "meter_id": t.column("meter_id"),
            "ts": t.column("ts"),
            "value": t.column("value"),
            "expected": pa.array(np.arange(n, dtype=float)),
            "sigma": pa.array(np.full(n, 0.5)),
            "score": pa.array(np.linspace(0, 1, n)),
            "is_anomaly": pa.array(anomalous, pa.bool_()),
            "model": [model] * n,
            "source": ["readings/0"] * n,
            "offset": np.arange(n),
            "scored_at": np.full(n, 1_700_000_000_000_000),
        },
        schema=SCORE_SCHEMA,
    )


def metrics(offsets: list[int], model: str = "online/1") -> pa.Table:
    k = len(offsets)
    return pa.table(
        {
            "model": [model] * k,
            "source": ["readings/0"] * k,
            "offset": offsets,
            "recorded_at": [1_700_000_000_000_000 + o for o in offsets],
            "n": [100] * k,
            "sse": [float(o) for o in offsets],
            "sae": [2.0] * k,
            "persistence_sse": [3.0] * k,
            "persistence_sae": [4.0] * k,
        },
        schema=ONLINE_METRIC_SCHEMA,
    )


def scored(
    predictions: pa.Table | None = None,
    scores: pa.Table | None = None,
    online: pa.Table | None = None,
    checkpoints: tuple[Checkpoint, ...] = (),
) -> Scored:
    return Scored(
        PREDICTION_SCHEMA.empty_table() if predictions is None else predictions,
        SCORE_SCHEMA.empty_table() if scores is None else scores,
        ONLINE_METRIC_SCHEMA.empty_table() if online is None else online,
        checkpoints,
    )


def expected_actuals(batch: ReadingBatch, preds: pa.Table) -> np.ndarray:
    """The value of the reading each prediction targets, NaN if ``batch`` has none."""
    frame = batch.to_pandas().set_index(["meter_id", "ts"])["value"]
    p = preds.to_pandas()
    keys = pd.MultiIndex.from_arrays([p["meter_id"], p["target_ts"]])
    return frame.reindex(keys).to_numpy(dtype=float)


class TestScoredContract:
    def test_a_scored_batch_is_stored_with_its_readings(self, store: Store) -> None:
        batch = readings(meters=2, steps=3)
        preds = predictions_for(batch)
        flags = [False, True, False, False, False, True]
        result = store.write(
            batch, NO_DEAD, {}, scored=scored(preds, scores_for(batch, flags), metrics([0]))
        )
        # targets inside the batch: steps 1, 2 (horizon 1) and 2 (horizon 2), per meter
        assert (result.inserted, result.predictions, result.scores, result.actuals) == (6, 12, 6, 6)
        back = store.predictions()
        assert back.columns.tolist() == [*PREDICTION_SCHEMA.names, "actual"]
        order = ["meter_id", "ts", "horizon"]
        want = preds.to_pandas().sort_values(order, kind="stable").reset_index(drop=True)
        assert back[order].equals(want[order])
        assert back["ts"].dtype == batch.to_pandas()["ts"].dtype  # as readings() gives them
        assert back.dtypes.to_dict() == store.predictions("nope").dtypes.to_dict()
        assert back["horizon"].dtype == np.int32 and back["target_ts"].dtype == back["ts"].dtype
        pd.testing.assert_frame_equal(
            back.drop(columns="actual"), want, check_dtype=False, check_exact=True
        )
        actual = expected_actuals(batch, pa.Table.from_pandas(want, preserve_index=False))
        np.testing.assert_array_equal(back["actual"].to_numpy(), actual)
        assert np.isnan(actual).sum() == 6
        got_scores = store.scores()
        assert got_scores.columns.tolist() == SCORE_SCHEMA.names
        assert got_scores.dtypes.to_dict() == store.scores("nope").dtypes.to_dict()
        assert got_scores["is_anomaly"].dtype == bool
        assert got_scores["is_anomaly"].tolist() == flags
        assert got_scores["value"].tolist() == batch.table.column("value").to_pylist()
        assert got_scores["ts"].tolist() == batch.to_pandas()["ts"].tolist()
        assert store.scores(anomalies_only=True)["ts"].tolist() == [
            pd.Timestamp("2024-01-01 01:00", tz="UTC"),
            pd.Timestamp("2024-01-01 02:00", tz="UTC"),
        ]
        counts = store.counts()
        assert (counts.readings, counts.predictions, counts.anomalies) == (6, 12, 2)

    def test_a_redelivered_batch_writes_nothing_twice_and_keeps_the_first_model(
        self, store: Store
    ) -> None:
        batch = readings(meters=2, steps=4)
        first = scored(predictions_for(batch), scores_for(batch, [True] * 8), metrics([0, 8]))
        store.write(batch, NO_DEAD, {}, scored=first)
        redelivered = scored(
            predictions_for(batch, model="forecaster/2"),
            scores_for(batch, [False] * 8, model="detector/2"),
            metrics([0, 8]),
        )
        again = store.write(batch, NO_DEAD, {}, scored=redelivered)
        assert (again.inserted, again.predictions, again.scores, again.actuals) == (0, 0, 0, 0)
        assert set(store.predictions()["model"]) == {V1}
        assert len(store.predictions()) == 16
        assert store.scores()["is_anomaly"].all() and set(store.scores()["model"]) == {V1}
        assert len(store.online_metrics()) == 2
        counts = store.counts()
        assert (counts.predictions, counts.anomalies) == (16, 8)

    def test_a_batch_overlapping_stored_rows_inserts_only_the_new_ones(self, store: Store) -> None:
        batch = readings(meters=2, steps=4)
        early = batch.take(pa.array([0, 1, 4, 5]))
        store.write(
            early,
            NO_DEAD,
            {},
            scored=scored(predictions_for(early), scores_for(early, [True, False, False, True])),
        )
        # a replay from an older offset: half of it is stored already, with older verdicts
        result = store.write(
            batch,
            NO_DEAD,
            {},
            scored=scored(
                predictions_for(batch, model="forecaster/2"),
                scores_for(batch, [True] * 8, model="detector/2"),
            ),
        )
        assert (result.inserted, result.duplicates) == (4, 4)
        assert (result.predictions, result.scores) == (8, 4)
        # per meter: stored ones waiting for step 2 (from 0 and 1) and step 3 (from 1),
        # plus the new one from step 2 for step 3
        assert result.actuals == 2 * (3 + 1)
        back = store.predictions()
        assert (back["model"] == V1).sum() == 8 and (back["model"] == "forecaster/2").sum() == 8
        np.testing.assert_array_equal(
            back["actual"].to_numpy(),
            expected_actuals(batch, pa.Table.from_pandas(back, preserve_index=False)),
        )
        flags = [True, False, True, True, False, True, True, True]  # the first verdicts
        assert store.scores()["is_anomaly"].tolist() == flags
        counts = store.counts()
        assert (counts.predictions, counts.anomalies) == (16, 2 + 4)

    def test_missing_numbers_are_stored_as_unknown_and_skipped_by_accuracy(
        self, store: Store
    ) -> None:
        batch = readings(meters=1, steps=4)
        preds = predictions_for(batch, horizons=(1,)).to_pandas()
        preds.loc[0, "yhat"] = np.nan  # no forecast for the first step
        preds.loc[1, ["q10", "q90"]] = np.nan  # no interval for the second
        table = pa.Table.from_pandas(preds, schema=PREDICTION_SCHEMA, preserve_index=False)
        flags = pa.array([None, True, False, None], pa.bool_())
        score_table = scores_for(batch, [False] * 4)
        at = score_table.schema.get_field_index("is_anomaly")
        score_table = score_table.set_column(at, "is_anomaly", flags)
        result = store.write(batch, NO_DEAD, {}, scored=scored(table, score_table))
        assert (result.predictions, result.scores, result.actuals) == (4, 4, 3)
        back = store.predictions()
        assert back["yhat"].isna().tolist() == [True, False, False, False]
        assert back["q10"].isna().tolist() == [False, True, False, False]
        assert store.scores()["is_anomaly"].tolist() == [False, True, False, False]
        assert store.counts().anomalies == 1
        acc = store.accuracy(by_meter=False).iloc[0]
        err = (preds["yhat"] - expected_actuals(batch, table))[1:3].to_numpy()
        assert acc["n"] == 2  # the NaN forecast and the one without actual are left out
        assert acc["rmse"] == np.sqrt(np.mean(err**2)) and acc["mae"] == np.mean(np.abs(err))
        assert acc["coverage"] == 1.0  # only the row with an interval counts (and hits)

    def test_the_actual_is_filled_when_the_reading_comes_after_the_prediction(
        self, store: Store
    ) -> None:
        batch = readings(meters=2, steps=4)
        first, later = batch.take(pa.array([0, 4])), batch.take(pa.array([1, 2, 3, 5, 6, 7]))
        preds = predictions_for(first, horizons=(1, 3))
        made = store.write(first, NO_DEAD, {}, scored=scored(preds))
        assert made.predictions == 4 and made.actuals == 0
        assert store.predictions()["actual"].isna().all()
        filled = store.write(later, NO_DEAD, {})  # a plain write fills them too
        assert filled.actuals == 4 and filled.predictions == 0
        back = store.predictions()
        np.testing.assert_array_equal(
            back["actual"].to_numpy(),
            expected_actuals(batch, pa.Table.from_pandas(back, preserve_index=False)),
        )
        assert not back["actual"].isna().any()
        assert store.write(later, NO_DEAD, {}).actuals == 0  # redelivered readings

    def test_the_actual_is_filled_when_the_reading_comes_before_the_prediction(
        self, store: Store
    ) -> None:
        batch = readings(meters=2, steps=4)
        store.write(batch, NO_DEAD, {})
        preds = predictions_for(batch.take(pa.array([0, 1, 4])), horizons=(1, 2, 5))
        made = store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(preds))
        # steps 0 and 1 of each targeted step+1, step+2 (<= step 3 stored); +5 is beyond
        assert made.predictions == 9 and made.actuals == 6
        back = store.predictions()
        want = expected_actuals(batch, pa.Table.from_pandas(back, preserve_index=False))
        np.testing.assert_array_equal(back["actual"].to_numpy(), want)
        assert back["actual"].notna().sum() == 6
        again = store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(preds))
        assert again.predictions == 0 and again.actuals == 0

    def test_a_missing_reading_value_leaves_the_actual_unknown(self, store: Store) -> None:
        batch = readings(meters=1, steps=3)
        gap = ReadingBatch(batch.table.set_column(2, "value", pa.array([1.0, None, 3.0])))
        preds = predictions_for(gap.take(pa.array([0])), horizons=(1, 2))
        result = store.write(gap, NO_DEAD, {}, scored=scored(preds))
        assert result.actuals == 1
        assert store.predictions()["actual"].tolist()[1] == 3.0
        assert np.isnan(store.predictions()["actual"].tolist()[0])

    def test_predictions_filter_by_meter_range_and_horizon(self, store: Store) -> None:
        batch = readings(meters=3, steps=5)
        store.write(batch, NO_DEAD, {}, scored=scored(predictions_for(batch, horizons=(1, 24))))
        start = pd.Timestamp("2024-01-01 01:00", tz="UTC")
        end = pd.Timestamp("2024-01-01 03:00", tz="UTC")
        got = store.predictions("m-1", start, end, horizon=24)
        assert got["meter_id"].tolist() == ["m-1", "m-1"]
        assert got["ts"].tolist() == [start, start + pd.Timedelta("1h")]
        day = pd.Timedelta("24h")
        assert got["target_ts"].tolist() == [start + day, start + day + pd.Timedelta("1h")]
        assert got["horizon"].tolist() == [24, 24]
        assert len(store.predictions(horizon=1)) == 15
        assert len(store.predictions("nope")) == 0
        assert store.predictions("nope").columns.tolist() == [*PREDICTION_SCHEMA.names, "actual"]
        assert len(store.scores("nope")) == 0

    def test_accuracy_equals_a_hand_computation(self, store: Store) -> None:
        rng = np.random.default_rng(7)
        batch = readings(meters=3, steps=30, seed=3)
        preds = predictions_for(batch, horizons=(1, 2)).to_pandas()
        preds["yhat"] = preds["yhat"] + rng.normal(0, 0.3, len(preds))
        preds["q10"] = preds["yhat"] - rng.uniform(0, 0.4, len(preds))
        preds["q90"] = preds["yhat"] + rng.uniform(0, 0.4, len(preds))
        table = pa.Table.from_pandas(preds, schema=PREDICTION_SCHEMA, preserve_index=False)
        store.write(batch, NO_DEAD, {}, scored=scored(table))
        preds["actual"] = expected_actuals(batch, table)
        known = preds.dropna(subset=["actual"])
        since = pd.Timestamp("2024-01-01 10:00", tz="UTC")

        def by_hand(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
            err = frame["yhat"] - frame["actual"]
            inside = (frame["actual"] >= frame["q10"]) & (frame["actual"] <= frame["q90"])
            parts = frame.assign(se=err**2, ae=err.abs(), inside=inside.astype(float))
            g = parts.groupby(keys)
            return pd.DataFrame(
                {
                    "n": g.size(),
                    "rmse": np.sqrt(g["se"].mean()),
                    "mae": g["ae"].mean(),
                    "coverage": g["inside"].mean(),
                }
            ).reset_index()

        for by_meter, keys in ((True, ["meter_id", "horizon"]), (False, ["horizon"])):
            got = store.accuracy(by_meter=by_meter)
            want = by_hand(known, keys)
            assert got.columns.tolist() == [*keys, "n", "rmse", "mae", "coverage"]
            assert len(got) == (6 if by_meter else 2)
            assert got["coverage"].min() > 0 and got["coverage"].max() < 1  # a real mix
            pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-9)
        recent = store.accuracy(since=since, by_meter=False)
        want = by_hand(known[known["target_ts"] >= since], ["horizon"])
        pd.testing.assert_frame_equal(recent, want, check_dtype=False, rtol=1e-9)
        assert recent["n"].tolist() == [3 * 20, 3 * 20]
        assert store.accuracy(since=pd.Timestamp("2030-01-01", tz="UTC")).empty

    def test_checkpoints_replace_by_name_and_round_trip(self, store: Store) -> None:
        assert store.checkpoint("online") is None
        state = bytes(range(256)) + b"\x00"
        first = (
            Checkpoint("online", state, {"readings/0": 10, "readings/1": 3}),
            Checkpoint("features", b"", {}),
        )
        store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(checkpoints=first))
        got = store.checkpoint("online")
        assert got == Checkpoint("online", state, {"readings/0": 10, "readings/1": 3})
        assert store.checkpoint("features") == Checkpoint("features", b"", {})
        newer = (Checkpoint("online", b"v2", {"readings/0": 20}),)
        store.write(readings(meters=1, steps=1), NO_DEAD, {}, scored=scored(checkpoints=newer))
        assert store.checkpoint("online") == newer[0]
        assert store.checkpoint("features") == Checkpoint("features", b"", {})

    def test_checkpoints_by_prefix_are_exact_and_in_name_order(self, store: Store) -> None:
        assert store.checkpoints("online/g_1/") == []
        saved = (
            Checkpoint("online/g_1/readings/1", b"b", {"readings/1": 7}),
            Checkpoint("online/g_1/readings/0", b"a", {"readings/0": 3}),
            Checkpoint("online/gx1/readings/0", b"wildcard", {}),  # "_" is not a wildcard
            Checkpoint("online/G_1/readings/0", b"case", {}),  # nor is the case ignored
            Checkpoint("online/g_1", b"shorter", {}),
            Checkpoint("features", b"", {}),
        )
        store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(checkpoints=saved))
        got = store.checkpoints("online/g_1/")
        assert [cp.name for cp in got] == ["online/g_1/readings/0", "online/g_1/readings/1"]
        assert got[0] == saved[1] and got[1] == saved[0]
        newer = (Checkpoint("online/g_1/readings/1", b"b2", {"readings/1": 9}),)
        store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(checkpoints=newer))
        assert store.checkpoints("online/g_1/")[1] == newer[0]
        assert len(store.checkpoints("")) == len(saved)

    def test_online_metrics_are_idempotent_filtered_and_oldest_first(self, store: Store) -> None:
        store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(online=metrics([0, 100])))
        store.write(
            ReadingBatch.empty(), NO_DEAD, {}, scored=scored(online=metrics([100, 200, 300]))
        )
        store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(online=metrics([0], "sgd")))
        got = store.online_metrics()
        assert got.columns.tolist() == ONLINE_METRIC_SCHEMA.names
        assert got["offset"].tolist() == [0, 100, 200, 300, 0]
        assert got["sse"].tolist() == [0.0, 100.0, 200.0, 300.0, 0.0]
        mine = store.online_metrics(model="online/1", limit=2)
        assert mine["offset"].tolist() == [200, 300]
        assert mine["n"].tolist() == [100, 100]
        assert store.online_metrics(model="sgd")["model"].tolist() == ["sgd"]
        assert store.online_metrics(model="nope").empty

    def test_clusters_are_set_replaced_and_shown_with_meters(self, store: Store) -> None:
        store.write(readings(meters=3, steps=2), NO_DEAD, {})
        assert store.meters()["cluster"].isna().all()
        store.set_clusters({"m-0": 1, "m-1": 0, "m-new": 2})
        meters = store.meters().set_index("meter_id")
        assert str(meters["cluster"].dtype) == "Int64"
        assert meters["cluster"].fillna(-9).to_dict() == {"m-0": 1, "m-1": 0, "m-2": -9, "m-new": 2}
        assert meters.loc["m-new", "readings"] == 0 and meters.loc["m-0", "readings"] == 2
        store.set_clusters({"m-0": 3})
        assert store.meters().set_index("meter_id").loc["m-0", "cluster"] == 3
        assert store.counts().meters == 3  # a clustered meter without readings is not counted

    def test_a_write_without_scored_stores_nothing_scored(self, store: Store) -> None:
        result = store.write(readings(meters=2, steps=3), NO_DEAD, {})
        assert (result.predictions, result.scores, result.actuals) == (0, 0, 0)
        counts = store.counts()
        assert (counts.readings, counts.predictions, counts.anomalies) == (6, 0, 0)
        assert store.predictions().empty and store.scores().empty
        assert store.accuracy().empty and store.online_metrics().empty


# -- schema upgrades ------------------------------------------------------------
@pytest.fixture(params=STORES)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL whose database nothing has touched yet."""
    return store_url(request, tmp_path)


def run_raw(url: str, sql: list[str]) -> None:
    """Run statements on the store's database directly, as an older release would have."""
    if url.startswith("sqlite"):
        path = Path(url.partition("://")[2].partition("?")[0])
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            for statement in sql:
                conn.execute(statement)
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as pg:
        for statement in sql:
            pg.execute(statement.encode())


def test_a_database_of_the_first_schema_version_upgrades(empty_url: str, tmp_path: Path) -> None:
    settings = load_settings(None, project_dir=tmp_path, backends={"store": empty_url})
    url = settings.resolve(settings.backends.store)
    dialect = SQLITE if url.startswith("sqlite") else POSTGRES
    run_raw(
        url,
        [
            "CREATE TABLE schema_version (version INTEGER NOT NULL)",
            *statements(migrations(dialect)[0]),
            "INSERT INTO schema_version VALUES (1)",
            "INSERT INTO batches (created_at, lineage, inserted, lake_pending) "
            "VALUES (1, '{}', 2, 1)",
            "INSERT INTO readings (meter_id, ts, value, batch) "
            "VALUES ('m-0', 0, 1.5, 1), ('m-0', 3600000000, 2.5, 1)",
            "INSERT INTO meters (meter_id, first_ts, last_ts, readings, registered) "
            "VALUES ('m-0', 0, 3600000000, 2, 1)",
        ],
    )
    with make_store(settings).open() as store:
        assert store.readings().table.column("value").to_pylist() == [1.5, 2.5]
        meters = store.meters()
        assert meters["meter_id"].tolist() == ["m-0"] and meters["cluster"].isna().all()
        counts = store.counts()
        assert (counts.readings, counts.predictions, counts.anomalies) == (2, 0, 0)
        assert store.pending_lake_batches() == [1]
        # the new tables work on the old rows: a prediction for a stored reading
        preds = predictions_for(store.readings().take(pa.array([0])), horizons=(1,))
        result = store.write(ReadingBatch.empty(), NO_DEAD, {}, scored=scored(preds))
        assert result.predictions == 1 and result.actuals == 1
        assert store.predictions()["actual"].tolist() == [2.5]
        store.set_clusters({"m-0": 4})
        assert store.meters()["cluster"].tolist() == [4]
    with make_store(settings).open() as store:  # reopening applies nothing twice
        assert store.counts().predictions == 1


def test_predictions_waiting_in_a_version_4_database_get_their_actuals(
    empty_url: str, tmp_path: Path
) -> None:
    """Version 5 finds waiting predictions by their leads; those stored before it too."""
    settings = load_settings(None, project_dir=tmp_path, backends={"store": empty_url})
    url = settings.resolve(settings.backends.store)
    dialect = SQLITE if url.startswith("sqlite") else POSTGRES
    hour, t0 = 3_600_000_000, int(pd.Timestamp("2024-01-01", tz="UTC").value // 1000)
    columns = 'meter_id, ts, horizon, target_ts, yhat, model, source, "offset", scored_at'
    run_raw(
        url,
        [
            "CREATE TABLE schema_version (version INTEGER NOT NULL)",
            *(s for script in migrations(dialect)[:4] for s in statements(script)),
            "INSERT INTO schema_version VALUES (4)",
            f"INSERT INTO predictions ({columns}) VALUES "  # noqa: S608
            f"('m-0', {t0}, 1, {t0 + hour}, 1.0, 'm/1', 'r/0', 0, 0), "
            f"('m-0', {t0}, 2, {t0 + 2 * hour}, 2.0, 'm/1', 'r/0', 0, 0), "
            f"('m-1', {t0 + hour}, 1, {t0 + 2 * hour}, 3.0, 'm/1', 'r/0', 1, 0)",
        ],
    )
    with make_store(settings).open() as store:
        later = readings(meters=2, steps=3)  # m-0 and m-1 at hours 0, 1, 2
        result = store.write(later, NO_DEAD, {})
        assert result.actuals == 3
        got = store.predictions().set_index(["meter_id", "horizon"])["actual"]
        values = later.table.to_pandas().set_index(["meter_id", "ts"])["value"]
        at = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta([1, 2, 2], "h")
        expected = [values[("m-0", at[0])], values[("m-0", at[1])], values[("m-1", at[2])]]
        assert got.tolist() == pytest.approx(expected)
