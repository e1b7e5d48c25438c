"""Small builders shared by the test suites."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from meterops.types import ReadingBatch


def readings(
    meters: int = 3, steps: int = 4, start: str = "2024-01-01", seed: int = 0, **covariates: Any
) -> ReadingBatch:
    """``meters`` x ``steps`` hourly readings with distinct values."""
    rng = np.random.default_rng(seed)
    ids = np.repeat([f"m-{i}" for i in range(meters)], steps)
    ts = pd.Timestamp(start, tz="UTC") + pd.to_timedelta(np.tile(np.arange(steps), meters), "h")
    frame = pd.DataFrame({"meter_id": ids, "ts": ts, "value": rng.random(meters * steps)})
    for name, value in covariates.items():
        frame[name] = value
    return ReadingBatch.from_pandas(frame)
