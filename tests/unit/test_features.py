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
