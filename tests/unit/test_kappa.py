"""The tabular Kappa scenario: the online ridge learns, never peeks, and survives the bus."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.linear_model import Ridge

from meterops.bus.base import Consumer, TopicPartition
from meterops.errors import BackendError, ConfigError, InputError
from meterops.kappa import (
    TABULAR,
    BatchScore,
    OnlineRidge,
    RunningMean,
    TabularEncoder,
    TabularSpec,
    _arrivals,
    _cut,
    prequential,
    read_table,
    replay,
    stream_table,
)
from meterops.pipeline import Pipeline
from meterops.settings import Settings
from meterops.types import Message

VEHICLES = Path(__file__).resolve().parents[2] / "data" / "vehicles_co2.csv"


def _linear(
    rows: int = 400, features: int = 8, noise: float = 0.5, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)) * rng.uniform(0.1, 100, size=features)
    w = rng.normal(size=features) / x.std(axis=0)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(features)])
    frame["y"] = 50.0 + x @ w * 10 + rng.normal(scale=noise, size=rows)
    return frame, w


def _batches(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[i : i + size] for i in range(0, len(frame), size)]


# -- the regressor ---------------------------------------------------------------------


def test_cumulative_rmse_falls_below_the_baseline_quickly_on_a_linear_problem() -> None:
    frame, _ = _linear()
    spec = TabularSpec.infer(frame, "y")
    scores = list(prequential(_batches(frame, 20), spec))
    assert len(scores) == 20
    first = scores[0]
    assert first.scored == 0 and first.rmse is None and first.cum_rmse is None
    # One batch of 20 rows for 8 features is enough to beat the mean by far.
    second = scores[1]
    assert second.cum_rmse is not None and second.baseline_cum_rmse is not None
    assert second.cum_rmse < 0.5 * second.baseline_cum_rmse
    last = scores[-1]
    assert last.rmse is not None and last.rmse < 1.0  # the noise level is 0.5
    assert last.cum_rmse is not None and last.baseline_cum_rmse is not None
    assert last.cum_rmse < 0.1 * last.baseline_cum_rmse
    assert [s.seen for s in scores] == list(range(0, 400, 20))


def test_state_after_batches_equals_a_batch_ridge_fit_on_standardised_features() -> None:
    frame, _ = _linear(rows=250, noise=3.0, seed=1)
    x = frame.drop(columns="y").to_numpy()
    y = frame["y"].to_numpy()
    model = OnlineRidge(alpha=5.0)
    for start in (0, 7, 60, 61, 200):  # uneven batches, one of a single row
        end = {0: 7, 7: 60, 60: 61, 61: 200, 200: 250}[start]
        model.learn_many(x[start:end], y[start:end])
    mean, std = x.mean(axis=0), x.std(axis=0)
    reference = Ridge(alpha=5.0).fit((x - mean) / std, y)
    probe = np.random.default_rng(2).normal(size=(30, x.shape[1])) * std + mean
    np.testing.assert_allclose(
        model.predict_many(probe), reference.predict((probe - mean) / std), rtol=1e-9, atol=1e-7
    )
    # Same rows in another batching: the same model.
    again = OnlineRidge(alpha=5.0).learn_many(x, y)
    np.testing.assert_allclose(again.coef_, model.coef_, rtol=1e-9, atol=1e-12)


def test_predictions_for_a_batch_never_see_its_own_targets() -> None:
    frame, _ = _linear(rows=120, seed=3)
    spec = TabularSpec.infer(frame, "y")

    class Spy(OnlineRidge):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[np.ndarray] = []

        def predict_many(self, x: np.ndarray) -> np.ndarray:
            out = super().predict_many(x)
            self.seen.append(out.copy())
            return out

    honest, tampered = Spy(), Spy()
    list(prequential(_batches(frame, 20), spec, honest))
    changed = frame.copy()
    changed.loc[60:79, "y"] = 1e6  # batch 4's targets only
    list(prequential(_batches(changed, 20), spec, tampered))
    for k in range(4):  # batches 1..4: made before batch 4's targets were learned
        np.testing.assert_array_equal(honest.seen[k], tampered.seen[k])
    assert not np.allclose(honest.seen[4], tampered.seen[4])  # learned afterwards


def test_pure_noise_is_not_predicted_better_than_the_mean() -> None:
    # A model that learned a batch before predicting it would fit the noise
    # in-sample and score far below the baseline here.
    rng = np.random.default_rng(4)
    frame = pd.DataFrame(rng.normal(size=(300, 15)), columns=[f"x{i}" for i in range(15)])
    frame["y"] = rng.normal(size=300)
    scores = list(prequential(_batches(frame, 20), TabularSpec.infer(frame, "y")))
    last = scores[-1]
    assert last.cum_rmse is not None and last.baseline_cum_rmse is not None
    assert last.cum_rmse > 0.95 * last.baseline_cum_rmse


def test_missing_features_are_imputed_and_missing_targets_are_skipped() -> None:
    frame, _ = _linear(rows=100, seed=5)
    frame.loc[::7, "x1"] = np.nan
    frame.loc[::11, "y"] = np.nan
    scores = list(prequential(_batches(frame, 25), TabularSpec.infer(frame, "y")))
    assert [s.n for s in scores] == [25, 25, 25, 25]
    skipped = frame["y"].iloc[25:].isna().sum()
    assert sum(s.scored for s in scores) == 75 - skipped
    assert all(s.rmse is not None and np.isfinite(s.rmse) for s in scores[1:])


def test_infinite_features_count_as_missing_and_text_numbers_are_a_target() -> None:
    frame = pd.DataFrame({"a": [1.0, np.inf, 3.0, -np.inf] * 5, "y": ["1", "2", "3", "4"] * 5})
    spec = TabularSpec.infer(frame, "y")
    scores = list(prequential(_batches(frame, 5), spec))
    assert all(s.rmse is not None and np.isfinite(s.rmse) for s in scores[1:])


def test_alpha_is_checked_and_clone_is_untrained() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        OnlineRidge(alpha=0)
    model = OnlineRidge(alpha=2.0).learn_many(np.ones((3, 1)), np.arange(3.0))
    twin = model.clone()
    assert twin.get_params() == {"alpha": 2.0} and twin.n_ == 0
    assert np.isnan(twin.predict_many(np.ones((2, 1)))).all()
    assert np.isnan(RunningMean().predict_many(np.ones((2, 1)))).all()
    assert RunningMean().learn_many(np.ones((3, 1)), np.array([1.0, np.nan, 3.0])).mean_ == 2.0


# -- features ------------------------------------------------------------------------------


def test_one_hot_vocabulary_grows_by_appending_and_caps_per_column() -> None:
    spec = TabularSpec("y", ("a",), ("kind", "colour"))
    encoder = TabularEncoder(spec, max_categories=2)
    first = encoder.transform(
        pd.DataFrame({"a": [1.0, 2.0], "kind": ["p", "q"], "colour": ["red", None], "y": 0.0})
    )
    assert encoder.names_ == ["a", "kind=p", "kind=q", "colour=red"]
    np.testing.assert_array_equal(first, [[1, 1, 0, 1], [2, 0, 1, 0]])
    second = encoder.transform(
        pd.DataFrame({"a": [3.0], "kind": ["r"], "colour": ["blue"], "y": 0.0})
    )
    # kind is full (2 values): "r" encodes as zeros; colour gets a 4th column.
    assert encoder.names_ == ["a", "kind=p", "kind=q", "colour=red", "colour=blue"]
    np.testing.assert_array_equal(second, [[3, 0, 0, 0, 1]])


def test_a_category_first_seen_in_a_batch_gets_no_weight_in_its_prediction() -> None:
    spec = TabularSpec("y", ("a",), ("kind",))
    old = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "kind": ["p", "q", "p", "q"]})
    old["y"] = old["a"] * 2 + (old["kind"] == "p") * 10
    new = pd.DataFrame({"a": [2.0], "kind": ["never-seen"], "y": [0.0]})
    model, encoder = OnlineRidge(alpha=1e-6), TabularEncoder(spec)
    model.learn_many(encoder.transform(old), old["y"].to_numpy())
    x_new = encoder.transform(new)
    assert x_new.shape[1] == model.width + 1
    mean_p = model.predict_many(encoder.transform(new.assign(kind="p")))
    mean_q = model.predict_many(encoder.transform(new.assign(kind="q")))
    assert mean_q < model.predict_many(x_new)[0] < mean_p  # between the two known kinds


# -- the file and the spec -------------------------------------------------------------------


def test_spec_of_the_vehicle_data() -> None:
    frame = read_table(VEHICLES)
    assert len(frame) == 234
    spec = TabularSpec.infer(frame, "co2_g_km")
    assert spec.numeric == ("displ", "year", "cyl")
    assert spec.categorical == ("manufacturer", "model", "trans", "drv", "fl", "class")
    chosen = TabularSpec.infer(frame, "co2_g_km", ["displ", " fl", "displ"])
    assert chosen.features == ("displ", "fl")


@pytest.mark.parametrize(
    ("frame", "target", "features", "message"),
    [
        (
            pd.DataFrame({"a": [1], "b": [2]}),
            "c",
            None,
            "no target column 'c'; the columns are: a",
        ),
        (pd.DataFrame({"a": [1, 2], "b": ["3", "x1"]}), "b", None, "'x1' in data row 2"),
        (pd.DataFrame({"a": [1], "b": [True]}), "b", None, "boolean"),
        (pd.DataFrame({"a": [1], "b": [np.nan]}), "b", None, "no finite value"),
        (pd.DataFrame({"a": [1], "b": [2]}), "b", ["a", "z"], "missing column\\(s\\) 'z'"),
        (pd.DataFrame({"a": [1], "b": [2]}), "b", ["b"], "cannot also be a feature"),
        (pd.DataFrame({"a": [1], "b": [2]}), "b", [" "], "names no column"),
        (pd.DataFrame({"meter_id": [1], "b": [2]}), "b", None, "reserved"),
    ],
)
def test_spec_errors_say_what_is_wrong(
    frame: pd.DataFrame, target: str, features: list[str] | None, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        TabularSpec.infer(frame, target, features)


def test_identifier_like_text_columns_are_left_out_unless_asked_for() -> None:
    frame = pd.DataFrame({"id": [f"car-{i}" for i in range(60)], "a": range(60), "y": 1.0})
    spec = TabularSpec.infer(frame, "y")
    assert spec.ignored == ("id",) and spec.features == ("a",)
    assert TabularSpec.infer(frame, "y", ["id", "a"]).categorical == ("id",)
    with pytest.raises(InputError, match="no usable feature"):
        TabularSpec.infer(frame[["id", "y"]], "y")


def test_read_table_formats_and_errors(tmp_path: Path) -> None:
    text = "a;b;y\n1;x;2.5\n2;y;3.5\n"
    (tmp_path / "semi.csv").write_text(text)
    with gzip.open(tmp_path / "semi.csv.gz", "wt") as fh:
        fh.write(text)
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "y": [2.5, 3.5]}).to_parquet(tmp_path / "t.pq")
    for name in ("semi.csv", "semi.csv.gz", "t.pq"):
        frame = read_table(tmp_path / name)
        assert list(frame.columns) == ["a", "b", "y"] and frame["y"].tolist() == [2.5, 3.5]
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "header.csv").write_text("a,b,y\n")
    (tmp_path / "dir").mkdir()
    for name, message in [
        ("empty.csv", "empty"),
        ("header.csv", "no data rows"),
        ("missing.csv", "no such file"),
        ("dir", "is a directory"),
    ]:
        with pytest.raises(InputError, match=message):
            read_table(tmp_path / name)


# -- on the bus ------------------------------------------------------------------------------


def test_stream_table_keeps_one_key_order_and_types() -> None:
    frame = pd.DataFrame({"a": [1, 2, 3], "k": ["x", None, "z"], "y": [1.0, 2.0, 3.0]})
    spec = TabularSpec.infer(frame, "y")
    table = stream_table(frame, spec, "kappa:t", np.array([2, 0, 1]))
    assert table.column_names == ["meter_id", "_row", "a", "k", "y"]
    assert set(table.column("meter_id").to_pylist()) == {"kappa:t"}
    assert table.column("_row").to_pylist() == [0, 1, 2]
    assert table.column("a").to_pylist() == [3.0, 1.0, 2.0]
    assert table.column("k").to_pylist() == ["z", "x", None]


def test_cut_makes_exact_micro_batches_from_uneven_arrivals() -> None:
    arrivals = [pa.table({"v": np.arange(a, b)}) for a, b in [(0, 7), (7, 37), (37, 40), (40, 41)]]
    sizes = [len(f) for f in _cut(arrivals, 20)]
    assert sizes == [20, 20, 1]
    joined = pd.concat(_cut(arrivals, 20))["v"].tolist()
    assert joined == list(range(41))


class _FakeConsumer(Consumer):
    """Hands out scripted polls; records commits."""

    def __init__(self, polls: list[list[Message]]) -> None:
        self.polls = polls
        self.commits: list[Mapping[TopicPartition, int]] = []

    def poll(self, max_rows: int, timeout: float) -> list[Message]:
        return self.polls.pop(0) if self.polls else []

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def assignment(self) -> set[TopicPartition]:
        return {(TABULAR, 0)}


def _message(key: str, rows: range, offset: int) -> Message:
    table = pa.table({"meter_id": [key] * len(rows), "_row": list(rows), "y": [0.0] * len(rows)})
    return Message(TABULAR, 0, offset, table)


def test_arrivals_skip_other_runs_and_redeliveries_and_commit() -> None:
    consumer = _FakeConsumer(
        [
            [_message("kappa:other", range(0, 5), 0), _message("kappa:me", range(0, 3), 5)],
            [_message("kappa:me", range(0, 3), 5), _message("kappa:me", range(3, 6), 8)],
        ]
    )
    got = list(_arrivals(consumer, "kappa:me", 6, 20, 0.01, 5.0))
    assert [t.column("_row").to_pylist() for t in got] == [[0, 1, 2], [3, 4, 5]]
    assert consumer.commits == [{(TABULAR, 0): 8}, {(TABULAR, 0): 11}]


def test_arrivals_report_lost_rows_and_a_silent_bus() -> None:
    gap = _FakeConsumer([[_message("kappa:me", range(2, 4), 0)]])
    with pytest.raises(BackendError, match="expected row 0, got 2"):
        list(_arrivals(gap, "kappa:me", 4, 20, 0.01, 5.0))
    silent = _FakeConsumer([])
    with pytest.raises(BackendError, match="only 0 of 4 rows came back"):
        list(_arrivals(silent, "kappa:me", 4, 20, 0.001, 0.05))


def test_replay_over_the_embedded_bus_scores_like_the_direct_run(settings: Settings) -> None:
    frame = read_table(VEHICLES)
    spec = TabularSpec.infer(frame, "co2_g_km")
    direct = list(prequential(_batches(frame, 20), spec))
    with Pipeline(settings) as pipe:
        first = list(replay(pipe, frame, spec, batch_rows=20))
        # A second run in the same project sees only its own rows.
        second = list(replay(pipe, frame, spec, batch_rows=20))
        shuffled = list(replay(pipe, frame, spec, batch_rows=50, shuffle=True, seed=7))
        assert pipe.bus.end_offsets(TABULAR)  # the topic exists with its partitions
    assert first == direct == second
    order = np.random.default_rng(7).permutation(len(frame))
    assert shuffled == list(prequential(_batches(frame.iloc[order], 50), spec))
    last: BatchScore = first[-1]
    assert last.cum_rmse is not None and last.baseline_cum_rmse is not None
    assert last.cum_rmse < 0.6 * last.baseline_cum_rmse
    with Pipeline(settings) as pipe, pytest.raises(InputError, match="batch-rows"):
        list(replay(pipe, frame, spec, batch_rows=0))
