"""The one feature definition: batch and stream agree, and nothing leaks from the future."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from meterops.errors import ConfigError
from meterops.features import FeatureSpec, FeatureState, build_frame, regularize, resolve_horizon

HOUR = pd.Timedelta("1h")


def _frame(seed: int = 0, days: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-01-01", periods=24 * days, freq="h", tz="UTC")
    parts = []
    for m in ("a", "b", "c"):
        v = rng.normal(10, 2, len(ts))
        v[rng.random(len(ts)) < 0.1] = np.nan  # missing readings
        f = pd.DataFrame(
            {"meter_id": m, "ts": ts, "value": v, "temperature": rng.normal(5, 3, len(ts))}
        )
        parts.append(f[rng.random(len(ts)) > 0.05])  # irregular gaps
    return pd.concat(parts).sample(frac=1, random_state=seed).reset_index(drop=True)


SPEC = FeatureSpec(holidays="FR", timezone="Europe/Paris", known_covariates=(), seasonal_means=2)


@pytest.mark.parametrize("horizon", [1, 6, 24])
@pytest.mark.parametrize("known", [False, True])
def test_batch_and_stream_agree(horizon: int, known: bool) -> None:
    frame = _frame()
    spec = FeatureSpec(**{**SPEC.__dict__, "known_covariates": ("temperature",) if known else ()})
    batch = build_frame(frame, spec, horizon, freq=HOUR)
    state = FeatureState(spec, "1h", 24, ("temperature",), origin=frame["ts"].min())
    ts = np.sort(frame["ts"].unique())
    checked = 0
    for lo in range(0, len(ts), 97):
        hi = ts[min(lo + 97, len(ts) - 1)]
        state.update(frame[(frame["ts"] >= ts[lo]) & (frame["ts"] < hi)])
        want = batch[(batch["ts"] >= hi - HOUR) & (batch["ts"] < hi + horizon * HOUR)]
        got = state.features(
            want["meter_id"].to_numpy(),
            want["ts"],
            horizon,
            known={"temperature": want["temperature"].to_numpy()} if known else None,
        )
        expected = want.drop(columns="value").reset_index(drop=True)
        assert list(got.columns) == list(expected.columns)
        for c in expected.columns[2:]:
            np.testing.assert_allclose(
                got[c].to_numpy(float),
                expected[c].to_numpy(float),
                rtol=1e-9,
                atol=1e-9,
                err_msg=c,
            )
        checked += len(want)
    assert checked >= 7 * 3 * horizon


@pytest.mark.parametrize("horizon", [1, 3, 24, 25, 168])
def test_no_feature_uses_data_after_t_minus_h(horizon: int) -> None:
    """Changing every reading after t - h leaves the features of target t unchanged."""
    frame = _frame(days=40)
    target = pd.Timestamp("2024-02-01T12:00Z")
    cutoff = target - horizon * HOUR
    base = build_frame(frame, SPEC, horizon, freq=HOUR, origin=frame["ts"].min())
    poisoned = frame.copy()
    late = poisoned["ts"] > cutoff
    poisoned.loc[late, "value"] = 1e6
    poisoned.loc[late, "temperature"] = -1e6
    after = build_frame(poisoned, SPEC, horizon, freq=HOUR, origin=frame["ts"].min())
    names = [c for c in base.columns if c not in ("meter_id", "ts", "value")]
    a = base[base["ts"] == target][names].to_numpy(float)
    b = after[after["ts"] == target][names].to_numpy(float)
    assert a.shape[0] == 3
    np.testing.assert_array_equal(a, b)
    # and the features really do use data up to t - h
    assert np.isfinite(a[:, names.index("lag0")]).any()


def test_regularize_fills_gaps_and_snaps_off_grid_times() -> None:
    frame = pd.DataFrame(
        {
            "meter_id": ["m", "m", "m", "m"],
            "ts": pd.to_datetime(
                [
                    "2024-01-01T00:00:00Z",
                    "2024-01-01T01:00:10Z",
                    "2024-01-01T01:00:00Z",
                    "2024-01-01T04:00:00Z",
                ]
            ),
            "value": [1.0, 3.0, 1.0, np.inf],
        }
    )
    grid = regularize(frame, HOUR)
    assert grid["value"].tolist()[:2] == [1.0, 2.0]
    assert len(grid) == 5 and grid["value"].isna().sum() == 3


def test_resolve_horizon() -> None:
    assert resolve_horizon("24h", HOUR) == 24
    assert resolve_horizon("1", HOUR) == 1
    assert resolve_horizon("30min", pd.Timedelta("15min")) == 2
    assert resolve_horizon("1d", pd.Timedelta("1d")) == 1
    with pytest.raises(ConfigError):
        resolve_horizon("90min", HOUR)
    with pytest.raises(ConfigError):
        resolve_horizon("soon", HOUR)


def test_daily_data_drops_sub_step_windows() -> None:
    plan = FeatureSpec().plan(pd.Timedelta("1d"), 1)
    assert "season1d_0" not in plan.names and "season7d_0" in plan.names
    assert "roll1d_mean" not in plan.names


# --------------------------------------------------------------------------- the stream state


def _build(frame: pd.DataFrame, spec: FeatureSpec, horizon: int) -> pd.DataFrame:
    return build_frame(frame, spec, horizon, freq=HOUR, origin=frame["ts"].min())


def _assert_rows_match(
    state: FeatureState, batch: pd.DataFrame, want: pd.DataFrame, h: int
) -> None:
    got = state.features(want["meter_id"].to_numpy(), want["ts"], h)
    expected = want.drop(columns="value").reset_index(drop=True)
    assert list(got.columns) == list(expected.columns)
    for c in expected.columns[2:]:
        np.testing.assert_allclose(
            got[c].to_numpy(float), expected[c].to_numpy(float), rtol=1e-9, atol=1e-9, err_msg=c
        )


def test_vectorised_update_matches_build_frame() -> None:
    """Shuffled chunks with duplicates, gaps, NaN and meters arriving late, in one step each."""
    rng = np.random.default_rng(2)
    ts = pd.date_range("2024-01-01", periods=320, freq="h", tz="UTC")
    parts = []
    for start in range(0, 320, 40):  # chunks in time order, shuffled inside
        n = 90
        meters = ["a", "b"] if start < 120 else ["a", "b", "c"]  # "c" appears mid-stream
        parts.append(
            pd.DataFrame(
                {
                    "meter_id": rng.choice(meters, n),
                    "ts": ts[start + rng.integers(0, 40, n)],  # duplicates and gaps
                    "value": rng.normal(size=n),
                    "temperature": rng.normal(size=n),
                }
            )
        )
        parts[-1].loc[rng.random(n) < 0.1, "value"] = np.nan
    spec = FeatureSpec(seasonal_periods=("1d", "7d"), seasonal_means=2, calendar="cyclic")
    state = FeatureState(spec, "1h", 24, ("temperature",), origin=ts[0])
    seen = []
    for part in parts:
        state.update(part)
        seen.append(part)
        frame = pd.concat(seen, ignore_index=True)
        for h in (1, 24):
            batch = _build(frame, spec, h)
            top = part["ts"].max()
            want = batch[(batch["ts"] >= part["ts"].min()) & (batch["ts"] <= top)]
            _assert_rows_match(state, part, want, h)
    assert sorted(state.meters) == ["a", "b", "c"]
    assert state.length > state.base_length  # grew to serve a 40-step batch's earliest rows


def test_feature_matrix_is_features_in_plan_order() -> None:
    frame = _frame(days=10)
    state = FeatureState(SPEC, "1h", 24, ("temperature",), origin=frame["ts"].min())
    state.update(frame)
    ids = np.array(["a", "b", "c", "nope"])
    target = pd.Series([frame["ts"].max() + HOUR] * 4)
    table = state.features(ids, target, 24)
    matrix = state.feature_matrix(ids, target, 24)
    assert list(table.columns[2:]) == state.names(24) == SPEC.plan(HOUR, 24, ("temperature",)).names
    np.testing.assert_array_equal(table.iloc[:, 2:].to_numpy(float), matrix)
    small = state.feature_matrix(ids, target, 24, dtype=np.float32)
    assert small.dtype == np.float32
    np.testing.assert_allclose(small, matrix, rtol=1e-6)
    assert np.isnan(matrix[3, : len(SPEC.plan(HOUR, 24).level_columns)]).all()  # unknown meter
    with pytest.raises(ConfigError, match="max_horizon"):
        state.feature_matrix(ids, target, 25)


def test_one_reading_at_a_time_gives_the_same_numbers_as_one_batch() -> None:
    frame = _frame(days=9).sort_values("ts", kind="stable").reset_index(drop=True)
    covs = ("temperature",)
    batched = FeatureState(SPEC, "1h", 24, covs, origin=frame["ts"].min())
    single = FeatureState(SPEC, "1h", 24, covs, origin=frame["ts"].min())
    batched.update(frame)
    single.update(frame.iloc[:-60])
    for i in range(len(frame) - 60, len(frame)):
        single.update(frame.iloc[i : i + 1])
    ids = np.array(["a", "b", "c"])
    target = pd.Series([frame["ts"].max() + HOUR] * 3)
    for h in (1, 6, 24):
        np.testing.assert_array_equal(
            single.feature_matrix(ids, target, h), batched.feature_matrix(ids, target, h)
        )


def test_targets_after_the_last_reading_match_build_frame() -> None:
    """Anchors after a meter's last slot: rolling statistics from the part of the window held."""
    frame = _frame(days=12)
    last = frame["ts"].max()
    state = FeatureState(SPEC, "1h", 24, ("temperature",), origin=frame["ts"].min())
    state.update(frame)
    future = pd.DataFrame(
        {"meter_id": "a", "ts": pd.date_range(last + HOUR, periods=30, freq="h"), "value": np.nan}
    )
    batch = _build(pd.concat([frame, future], ignore_index=True), SPEC, 6)
    want = batch[
        (batch["meter_id"] == "a") & (batch["ts"] > last) & (batch["ts"] <= last + 6 * HOUR)
    ]
    assert len(want) == 6
    _assert_rows_match(state, future, want, 6)


def test_state_dict_round_trip_and_empty_buffers() -> None:
    frame = _frame(days=10)
    state = FeatureState(SPEC, "1h", 24, ("temperature",), origin=frame["ts"].min())
    state.update(frame)
    twin = FeatureState(SPEC, "1h", 24, ("temperature",))
    twin.load_state_dict(state.state_dict())
    ids = np.array(["a", "b", "c"])
    target = pd.Series([frame["ts"].max() + HOUR] * 3)
    np.testing.assert_array_equal(
        twin.feature_matrix(ids, target, 24), state.feature_matrix(ids, target, 24)
    )
    meta = {k: v for k, v in state.state_dict().items() if k in ("origin_ns", "length")}
    empty = FeatureState(SPEC, "1h", 24, ("temperature",))
    empty.load_state_dict(meta)
    assert empty.meters == [] and empty.length == state.length and empty.origin == state.origin


def test_window_statistics_depend_on_the_window_only() -> None:
    """The stream computes a slot's statistics once; a restart must find the same bits."""
    from meterops.features import _mean_std

    rng = np.random.default_rng(0)
    for width in (7, 24, 168):
        x = rng.normal(1000, 3, (20, width)) * rng.gamma(1, 1, (20, 1))
        with_gap = np.vstack([x, np.full((1, width), np.nan)])  # another row with NaN
        alone = _mean_std(x[3:4], 2, 2)
        for got in (_mean_std(x, 2, 2), _mean_std(with_gap, 2, 2)):
            np.testing.assert_array_equal(got[0][3:4], alone[0])
            np.testing.assert_array_equal(got[1][3:4], alone[1])
