"""The online model in the registry: learners merged, logged with their metrics, gated."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from meterops.errors import Unavailable
from meterops.models.online import OnlineForecaster
from meterops.online_registry import OnlineRegistryLog
from meterops.online_stream import OnlineLearners, unpack_state
from meterops.pipeline import Pipeline
from meterops.registry import Registry
from meterops.settings import Settings
from meterops.store.base import RecentReadings, Scored, Store
from meterops.types import DEADLETTER_SCHEMA, PREDICTION_SCHEMA, SCORE_SCHEMA, ReadingBatch
from tests.unit.test_stream import fleet

PARTS = {"m0": "readings/0", "m1": "readings/0", "m2": "readings/1", "m3": "readings/1"}
BOTH = {"readings/0", "readings/1"}


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _recent(store: Store) -> RecentReadings:
    return RecentReadings(
        store, pd.Timestamp("2000-01-01", tz="UTC"), pd.Timestamp("2100-01-01", tz="UTC")
    )


def _learn(store: Store, learners: OnlineLearners, frame: pd.DataFrame, next_offset: int) -> None:
    """One micro-batch through the learners, stored as the worker stores it."""
    sources = frame["meter_id"].map(PARTS).to_numpy()
    nexts = np.full(len(frame), next_offset, np.int64)
    metrics, checkpoints = learners.step(frame, sources, nexts, 0, _recent(store))
    origins = pa.table({"source": sources, "offset": np.arange(len(frame))})
    scored = Scored(
        PREDICTION_SCHEMA.empty_table(), SCORE_SCHEMA.empty_table(), metrics, checkpoints
    )
    store.write(
        ReadingBatch.from_pandas(frame), DEADLETTER_SCHEMA.empty_table(), {}, origins, scored
    )


@pytest.fixture
def online_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(scoring={"online_registry_every": 3600})


def _days(frame: pd.DataFrame, lo: int, hi: int) -> pd.DataFrame:
    start = frame["ts"].min()
    keep = (frame["ts"] >= start + pd.Timedelta(days=lo)) & (
        frame["ts"] < start + pd.Timedelta(days=hi)
    )
    return frame[keep].reset_index(drop=True)


def test_logs_the_merged_learners_with_their_metrics_then_gates_them(
    online_settings: Settings,
) -> None:
    data = fleet(meters=4, days=12, seed=7).sort_values(["ts", "meter_id"], ignore_index=True)
    clock = Clock()
    with Pipeline(online_settings) as pipe:
        store = pipe.store
        learners = OnlineLearners(store, online_settings.worker.group)
        _learn(store, learners, _days(data, 0, 9), 10)
        _learn(store, learners, _days(data, 9, 10), 20)
        first_rows = store.online_metrics()
        logger = OnlineRegistryLog(
            online_settings, store, online_settings.worker.group, clock=clock
        )
        assert logger.maybe_log(BOTH) is None  # a worker logs after a full interval of learning
        clock.now += 3600
        version = logger.maybe_log(BOTH)
        assert version is not None
        verdict = logger.wait(60)
        assert verdict is not None and verdict.promoted and verdict.champion is None

        with Registry.from_settings(online_settings) as registry:
            (logged,) = registry.list()
            assert registry.champion() == version
            model = registry.load(version)
        assert logged.version == version and logged.tags["model"] == "online"
        n = int(first_rows["n"].sum())
        assert logged.metrics["prequential_n_h1"] == n > 0
        assert logged.metrics["prequential_rmse_h1"] == pytest.approx(
            math.sqrt(first_rows["sse"].sum() / n)
        )
        assert logged.metrics["prequential_persistence_mae_h1"] == pytest.approx(
            first_rows["persistence_sae"].sum() / n
        )
        lineage = json.loads(logged.tags["lineage"])
        assert lineage["checkpoint_offsets"] == {"readings/0": 20, "readings/1": 20}
        assert pd.Timestamp(logged.tags["data_end"]) == data["ts"].min() + pd.Timedelta(
            days=10
        ) - pd.Timedelta("1h")
        # the registry holds the merged learners: every row each of them learned
        assert isinstance(model, OnlineForecaster)
        saved = store.checkpoints(f"online/{online_settings.worker.group}/")
        parts = [OnlineForecaster.from_state(unpack_state(cp.state)) for cp in saved]
        assert len(parts) == 2 and all(p.rows_seen_ > 0 for p in parts)
        assert model.rows_seen_ == sum(p.rows_seen_ for p in parts)

        # within the interval: nothing, even with new data learned
        _learn(store, learners, _days(data, 10, 11), 30)
        clock.now += 600
        assert logger.maybe_log(BOTH) is None

        # a restarted worker reads where the last version stands from the registry
        clock.now += 2900  # 3500 s after the first version
        restarted = OnlineRegistryLog(
            online_settings, store, online_settings.worker.group, clock=clock
        )
        assert restarted.maybe_log(BOTH) is None
        restarted.close()

        clock.now += 1000  # past the interval: a second version with the new rows only
        second = logger.maybe_log(BOTH)
        assert second == version + 1
        again = logger.wait(120)
        newest = store.online_metrics()
        new_rows = newest.iloc[len(first_rows) :]
        assert len(new_rows) == 2
        with Registry.from_settings(online_settings) as registry:
            latest = registry.list()[0]
            champion = registry.champion()
        assert latest.metrics["prequential_n_h1"] == int(new_rows["n"].sum())
        assert json.loads(latest.tags["lineage"])["checkpoint_offsets"] == {
            "readings/0": 30,
            "readings/1": 30,
        }
        # the real gate ran: both recipes re-run on the stored readings. The champion
        # is the same online recipe, so it cannot win by the margin: it stays champion.
        assert again is not None and again.evidence.startswith("re-run")
        assert not again.promoted and champion == version
        (scores,) = again.per_horizon.values()
        assert scores["challenger"] == pytest.approx(scores["champion"])

        # nothing learned since: no new version, however late
        clock.now += 10 * 3600
        assert logger.maybe_log(BOTH) is None
        logger.close()


def test_only_the_owner_of_partition_zero_logs_and_zero_means_never(
    make_settings: Callable[..., Settings], project: Path
) -> None:
    data = fleet(meters=4, days=9, seed=8).sort_values(["ts", "meter_id"], ignore_index=True)
    on = make_settings(scoring={"online_registry_every": 3600})
    with Pipeline(on) as pipe:
        _learn(pipe.store, OnlineLearners(pipe.store, on.worker.group), data, 10)
        clock = Clock()
        other = OnlineRegistryLog(on, pipe.store, on.worker.group, clock=clock)
        off = make_settings(scoring={"online_registry_every": 0})
        never = OnlineRegistryLog(off, pipe.store, on.worker.group, clock=clock)
        # the owner of a group with no learner checkpoint yet: nothing to log
        empty = OnlineRegistryLog(on, pipe.store, "other-group", clock=clock)
        clock.now += 10 * 3600
        assert other.maybe_log({"readings/1", "readings/2"}) is None
        assert never.maybe_log(BOTH) is None
        assert empty.maybe_log(BOTH) is None
    assert not (project / ".meterops" / "mlflow.db").exists()  # the registry was never opened


def test_registry_errors_are_logged_not_raised(
    online_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unreachable(self: Registry) -> Registry:
        raise Unavailable("cannot open the registry at http://mlflow:5000: refused")

    monkeypatch.setattr(Registry, "open", unreachable)
    data = fleet(meters=2, days=9, seed=9).sort_values(["ts", "meter_id"], ignore_index=True)
    clock = Clock()
    group = online_settings.worker.group
    with Pipeline(online_settings) as pipe:
        _learn(pipe.store, OnlineLearners(pipe.store, group), data, 10)
        logger = OnlineRegistryLog(online_settings, pipe.store, group, clock=clock)
        clock.now += 3600
        assert logger.maybe_log(BOTH) is None
        assert "not logged to the registry" in caplog.text and "refused" in caplog.text
        clock.now += 1  # retried a minute later, not on every batch
        caplog.clear()
        assert logger.maybe_log(BOTH) is None and caplog.text == ""
        clock.now += 60
        assert logger.maybe_log(BOTH) is None and "refused" in caplog.text


def test_a_worker_logs_its_learners_and_an_accepted_online_model_becomes_its_champion(
    make_settings: Callable[..., Settings],
) -> None:
    """The wiring end to end: learn in the stream, log, gate, promote, switch, score."""
    cfg = make_settings(
        worker={"poll_timeout": 0.05},
        scoring={"online_registry_every": 0.5, "reload_every": 0.2, "horizons": ["1"]},
    )
    data = fleet(meters=4, days=12, seed=11).sort_values(["ts", "meter_id"], ignore_index=True)
    days = [_days(data, d, d + 1) for d in range(12)]
    with Pipeline(cfg) as pipe:
        worker = pipe.worker()
        for day in days[:10]:  # no champion yet: readings stored, learners learn
            pipe.producer.send("readings", ReadingBatch.from_pandas(day).table)
            pipe.producer.flush()
            while worker.step() is not None:
                pass
        time.sleep(0.6)
        pipe.producer.send("readings", ReadingBatch.from_pandas(days[10]).table)
        pipe.producer.flush()
        worker.step()  # past the interval: the merged learners go to the registry and the gate
        assert worker._online_log is not None and worker._online_log.wait(120) is not None
        with Registry.from_settings(cfg) as registry:
            versions = registry.list()  # one per interval of learning
            assert versions and {v.tags["model"] for v in versions} == {"online"}
            logged = versions[-1]  # the first one: nothing to beat, so promoted
            assert registry.champion() == logged.version
        deadline = time.monotonic() + 30
        while worker.model is None and time.monotonic() < deadline:
            worker.step(timeout=0.1)  # the watcher hands the new champion over between batches
        assert worker.model == f"meterops-forecaster/{logged.version}"
        pipe.producer.send("readings", ReadingBatch.from_pandas(days[11]).table)
        pipe.producer.flush()
        stats = worker.step()
        assert stats is not None and stats.model == worker.model
        worker.close()
        made = pipe.store.predictions(start=days[11]["ts"].min())
    assert len(made) == len(days[11]) and set(made["model"]) == {worker.model}
    assert made["yhat"].notna().mean() > 0.9
