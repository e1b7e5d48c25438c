"""kill -9 of a worker mid-stream, then a restart: nothing lost, nothing twice."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meterops.lake import Lake
from meterops.pipeline import Pipeline
from meterops.settings import load_settings
from tests.e2e.conftest import Run, cli_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def stream_file(path: Path, meters: int = 100, steps: int = 600) -> pd.DataFrame:
    """A CSV with good rows, exact repeats, conflicting repeats and invalid values."""
    rng = np.random.default_rng(7)
    ts = pd.date_range("2024-01-01", periods=steps, freq="h", tz="UTC")
    frame = pd.DataFrame(
        {
            "meter_id": np.repeat([f"m-{i:03d}" for i in range(meters)], steps),
            "ts": np.tile(ts, meters),
            "value": rng.gamma(2.0, 1.0, meters * steps).round(4),
        }
    )
    repeats = frame.sample(500, random_state=1)
    conflicts = frame.sample(300, random_state=2).assign(value=lambda f: f["value"] + 100)
    invalid = frame.sample(200, random_state=3).assign(value=5e7)
    out = pd.concat([frame, repeats, conflicts, invalid], ignore_index=True)
    out.to_csv(path, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
    return frame


def test_kill_9_mid_stream_then_restart_loses_and_duplicates_nothing(
    profile: str, workdir: Path, cli: Run
) -> None:
    truth = stream_file(workdir / "stream.csv")
    # 600 hours of data replayed in about 6 s, so the worker is killed mid-stream.
    replay = subprocess.Popen(cli_command("replay", "stream.csv", "--speed", "360000"), cwd=workdir)
    worker = subprocess.Popen(
        cli_command("worker", "--batch-rows", "2000"), cwd=workdir, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        with Pipeline(load_settings(workdir / "meterops.toml")) as pipe:
            while time.monotonic() < deadline:
                stored_now = pipe.store.counts().readings
                if stored_now > 10_000:
                    break
                time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        assert 10_000 < stored_now < len(truth), "not killed mid-stream"
        assert replay.wait(timeout=60) == 0
    finally:
        for proc in (worker, replay):
            if proc.poll() is None:
                proc.kill()
    cli("worker", "--until-idle")
    status = json.loads(cli("status", "--format", "json").stdout)
    assert status["lag"] == 0
    assert status["readings"] == len(truth)
    # Rejected ones: every conflicting repeat and every invalid value, once each.
    assert status["deadletters_by_reason"] == {
        "duplicate with a different value": 300,
        "value out of range": 200,
    }
    settings = load_settings(workdir / "meterops.toml")
    with Pipeline(settings) as pipe:
        stored = pipe.store.readings().to_pandas()
    merged = truth.merge(stored, on=["meter_id", "ts"], suffixes=("", "_stored"))
    assert len(merged) == len(truth) and (merged["value"] == merged["value_stored"]).all()
    lake = Lake(settings.resolve(settings.backends.lake)).open().read().to_pandas()
    assert len(lake) == len(truth)
    assert not lake.duplicated(["meter_id", "ts"]).any()
