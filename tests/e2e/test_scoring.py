"""The worker scores every reading with the champion: crash, restart and hot reload."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meterops.models.gbm import GBMForecaster
from meterops.pipeline import Pipeline
from meterops.registry import Emissions, Registry, data_fingerprint, input_example
from meterops.settings import load_settings
from meterops.stream import ChampionScorer, LoadedModel
from meterops.types import ReadingBatch
from tests.e2e.conftest import Run, cli_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LABEL = "meterops-forecaster"


def split_fleet(cli: Run, workdir: Path, meters: int = 20, stream_days: int = 8) -> pd.DataFrame:
    """Simulated fleet: a training file (32 days) and the stream that follows it."""
    cli("simulate", "--meters", str(meters), "--days", str(32 + stream_days), "--out", "fleet.csv")
    fleet = pd.read_csv(workdir / "fleet.csv", parse_dates=["ts"]).drop(columns=["label"])
    cut = fleet["ts"].min() + pd.Timedelta("32D")
    fleet[fleet["ts"] < cut].to_csv(workdir / "train.csv", index=False)
    stream = fleet[fleet["ts"] >= cut].sort_values(["ts", "meter_id"])
    stream.to_csv(workdir / "stream.csv", index=False)
    return stream.reset_index(drop=True)


def train(workdir: Path, seed: int, promote: bool) -> int:
    """Register a small GBM (1 step and 24 h) trained on train.csv; the CLI path of
    `meterops train` is tested elsewhere, here only the stream matters."""
    frame = pd.read_csv(workdir / "train.csv", parse_dates=["ts"])
    model = GBMForecaster(horizons=(1, 24), n_estimators=40, seed=seed, n_jobs=1).fit(frame)
    data_range = {"start": str(frame["ts"].min()), "end": str(frame["ts"].max()), "rows": 0}
    with Registry.from_settings(load_settings(workdir / "meterops.toml")) as registry:
        version = registry.log_training_run(
            model,
            {},
            {},
            data_range | {"meters": int(frame["meter_id"].nunique())},
            data_fingerprint(frame),
            Emissions(0.0, 0.0, 0.0),
            input_example(frame),
        )
        if promote:
            registry.promote(version, reason="test")
    return version


def stored(workdir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    with Pipeline(load_settings(workdir / "meterops.toml")) as pipe:
        return pipe.store.predictions(), pipe.store.scores()


def wait_for(workdir: Path, above: int, timeout: float = 90) -> int:
    """Wait until the store holds more than ``above`` predictions; returns the count."""
    deadline = time.monotonic() + timeout
    with Pipeline(load_settings(workdir / "meterops.toml")) as pipe:
        while time.monotonic() < deadline:
            now = pipe.store.counts().predictions
            if now > above:
                return now
            time.sleep(0.05)
    raise AssertionError(f"predictions never went above {above}: {now}")


def test_kill_9_during_scoring_then_restart_scores_every_reading_once(
    profile: str, workdir: Path, cli: Run
) -> None:
    stream = split_fleet(cli, workdir)
    train(workdir, seed=1, promote=True)
    # 8 days of hourly readings replayed over ~20 s; the worker dies while they flow
    worker = subprocess.Popen(
        cli_command("worker", "--batch-rows", "200"), cwd=workdir, stderr=subprocess.DEVNULL
    )
    replay = subprocess.Popen(
        cli_command("replay", "stream.csv", "--speed", str(8 * 86400 / 20)), cwd=workdir
    )
    try:
        seen = wait_for(workdir, 600)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        assert replay.wait(timeout=120) == 0
    finally:
        for proc in (worker, replay):
            if proc.poll() is None:
                proc.kill()
    assert seen < 2 * len(stream), "not killed mid-stream"
    cli("worker", "--until-idle", "--batch-rows", "200")
    predictions, scores = stored(workdir)
    # every reading: one score, one forecast per horizon, none twice
    assert len(scores) == len(stream) and len(predictions) == 2 * len(stream)
    assert not predictions.duplicated(["meter_id", "ts", "horizon"]).any()
    assert set(predictions["model"]) == {f"{LABEL}/1"}
    # the restarted worker's per-meter state continued exactly: same numbers as one
    # uninterrupted pass of the champion over the whole stream
    settings = load_settings(workdir / "meterops.toml")
    with Registry.from_settings(settings) as registry:
        loaded = LoadedModel(1, f"{LABEL}/1", registry.load("champion"))
    reference, reference_scores = ChampionScorer(loaded, settings.scoring).score(
        ReadingBatch.from_pandas(stream.assign(ts=pd.to_datetime(stream["ts"], utc=True))),
        np.full(len(stream), "x"),
        np.arange(len(stream), dtype=np.int64),
        0,
    )
    key = ["meter_id", "ts", "horizon"]
    ref = reference.to_pandas().sort_values(key).reset_index(drop=True)
    got = predictions.sort_values(key).reset_index(drop=True)
    assert (ref[key] == got[key]).all().all()
    np.testing.assert_allclose(got[["yhat", "q10", "q90"]], ref[["yhat", "q10", "q90"]], rtol=1e-6)
    # and the anomaly scores: each meter's residual scale was rebuilt from the store
    by_reading = ["meter_id", "ts"]
    ref_scores = reference_scores.to_pandas().sort_values(by_reading).reset_index(drop=True)
    got_scores = scores.sort_values(by_reading).reset_index(drop=True)
    np.testing.assert_allclose(got_scores["score"], ref_scores["score"], rtol=1e-6, atol=1e-12)
    assert (got_scores["is_anomaly"].astype(bool) == ref_scores["is_anomaly"]).all()
    # live accuracy: the actuals of the stream joined with the forecasts made for them
    with Pipeline(settings) as pipe:
        accuracy = pipe.store.accuracy(by_meter=False).set_index("horizon")
    joined = got.dropna(subset=["actual"])
    for h, part in joined.groupby("horizon"):
        rmse = float(np.sqrt(np.mean((part["actual"] - part["yhat"]) ** 2)))
        assert accuracy.loc[h, "n"] == len(part)
        assert accuracy.loc[h, "rmse"] == pytest.approx(rmse, rel=1e-6)
    assert accuracy.loc[1, "n"] > 0.9 * len(stream)


def test_promotion_while_readings_flow_switches_once_within_5s(
    profile: str, workdir: Path, cli: Run
) -> None:
    stream = split_fleet(cli, workdir, meters=20, stream_days=8)
    train(workdir, seed=1, promote=True)
    train(workdir, seed=2, promote=False)
    # a first day is waiting when the worker starts (it loads the champion first); once it
    # is scored, the next 7 days are replayed over ~40 s: they flow before, during and
    # after the promotion
    first = pd.to_datetime(stream["ts"]).min() + pd.Timedelta("1D")
    head = pd.to_datetime(stream["ts"]) < first
    stream[head].to_csv(workdir / "head.csv", index=False)
    stream[~head].to_csv(workdir / "tail.csv", index=False)
    cli("ingest", "head.csv", "--no-wait")
    log = (workdir / "worker.log").open("w")
    worker = subprocess.Popen(cli_command("worker", "--batch-rows", "500"), cwd=workdir, stderr=log)
    replay = None
    try:
        wait_for(workdir, 2 * int(head.sum()) - 1, timeout=120)
        replay = subprocess.Popen(
            cli_command("replay", "tail.csv", "--speed", str(7 * 86400 / 40)), cwd=workdir
        )
        wait_for(workdir, 2 * int(head.sum()) + 400)
        with Registry.from_settings(load_settings(workdir / "meterops.toml")) as registry:
            promoted_at = time.time()
            registry.promote(2, reason="switch while flowing")
            promoted_done = time.time()
        assert replay.wait(timeout=120) == 0
        wait_for(workdir, 2 * len(stream) - 1)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    finally:
        for proc in (worker, replay):
            if proc is not None and proc.poll() is None:
                proc.kill()
        log.close()
    predictions, scores = stored(workdir)
    assert len(scores) == len(stream) and not scores.duplicated(["meter_id", "ts"]).any()
    assert len(predictions) == 2 * len(stream)
    assert set(scores["model"]) == {f"{LABEL}/1", f"{LABEL}/2"}
    # one switch per partition: every reading before it by v1, every one after by v2
    for _, part in scores.groupby("source"):
        part = part.sort_values("offset")
        new = (part["model"] == f"{LABEL}/2").to_numpy()
        assert new.any() and (np.diff(new.astype(int)) >= 0).all()
    scored_at = scores["scored_at"] / 1e6
    first_new = scored_at[scores["model"] == f"{LABEL}/2"].min()
    last_old = scored_at[scores["model"] == f"{LABEL}/1"].max()
    assert first_new - promoted_done < 5.0
    assert last_old - promoted_at < 5.0
