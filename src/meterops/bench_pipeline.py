"""``meterops bench pipeline``: the scoring worker end to end, beside a per-reading reference.

On the embedded backends in a temporary project: a simulated fleet (default
1,000 meters, hourly), a gradient-boosted champion (horizons 1 step and 24 h,
10/50/90 % quantiles) trained on its first days and promoted in the
project's registry, the recent training days stored as history, then:

* **throughput**: a backlog of readings (by default 20 days of the fleet,
  480,000 readings in five micro-batches, so that writing one overlaps
  scoring the next as in a steady stream) published to the bus and drained
  by one in-process worker (validate, features, champion forecasts per
  horizon, anomaly scores, online learners, one store transaction, lake,
  predictions topic, commit), timed from the first poll to idle. The worker
  is warmed up first, untimed: it has scored the backlog's first time step
  (so every meter's history is in its buffers and learners) and its
  champion's boosters are compiled; start-up costs are not throughput.
  The rate is the median of three drains, each in a fresh project sharing
  the registry (``readings_per_s_runs`` lists all three);
* **latency**: after the same warm-up, a steady ``rate`` readings/s (one
  message per time step) for ``latency_seconds``; latency of a reading = the time its prediction is
  stored (``scored_at``) minus the time its message was published;
* **scaling**: the same backlog drained by 1 and by 2 worker processes in
  one consumer group, each run in a fresh project sharing the registry;
  rate = readings / (last commit - first ``scored_at``), so process
  start-up and shutdown are not counted and the last write is;
* **reference**: the same features and an online linear model through
  River's ``learn_one``/``predict_one``, one reading at a time
  (:func:`meterops.bench_online.river_rate`, the best of three runs), and meterops' own online
  learner per micro-batch on the same readings.

``ratio`` is the worker's end-to-end rate over River's per-reading rate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from meterops.settings import DEFAULT_TOML, Settings, load_settings

__all__ = ["bench_pipeline"]

_HISTORY_DAYS = 8  # stored before the stream: the deepest features read 7 days back
# the median of three drains: one 10-second drain swung by a tenth between runs on a quiet machine
_THROUGHPUT_RUNS = 3


def _project(root: Path, registry: Path | None = None) -> Settings:
    """A fresh embedded project in ``root`` (sharing ``registry``'s MLflow when given)."""
    root.mkdir(parents=True, exist_ok=True)
    text = DEFAULT_TOML.replace("poll_timeout = 0.5", "poll_timeout = 0.05")
    if registry is not None:
        text = text.replace(
            'tracking_uri = "sqlite:///.meterops/mlflow.db"',
            f'tracking_uri = "sqlite:///{registry / ".meterops" / "mlflow.db"}"',
        ).replace(
            'artifact_root = ".meterops/mlartifacts"',
            f'artifact_root = "{registry / ".meterops" / "mlartifacts"}"',
        )
    (root / "meterops.toml").write_text(text)
    return load_settings(root / "meterops.toml")


def _fleet(meters: int, days: int, seed: int) -> pd.DataFrame:
    from meterops.sources.simulator import FleetSpec, simulate

    spec = FleetSpec(
        meters=meters,
        start=pd.Timestamp("2024-01-01", tz="UTC"),
        periods=days * 24,
        freq="1h",
        seed=seed,
    )
    frame = simulate(spec).readings.drop(columns=["label"])
    out: pd.DataFrame = frame.sort_values(["ts", "meter_id"], kind="stable")
    return out.reset_index(drop=True)


def _champion(settings: Settings, train: pd.DataFrame, n_estimators: int) -> str:
    from meterops.models.gbm import GBMForecaster
    from meterops.registry import Emissions, Registry, data_fingerprint, input_example

    model = GBMForecaster(horizons=(1, "24h"), n_estimators=n_estimators, seed=0)
    model.fit(train)
    data_range = {
        "start": str(train["ts"].min()),
        "end": str(train["ts"].max()),
        "rows": len(train),
        "meters": int(train["meter_id"].nunique()),
    }
    with Registry.from_settings(settings) as registry:
        version = registry.log_training_run(
            model,
            {"purpose": "bench pipeline"},
            {},
            data_range,
            data_fingerprint(train),
            Emissions(0.0, 0.0, 0.0),
            input_example(train),
        )
        registry.promote(version, reason="bench pipeline champion")
    return f"{registry.model_name}/{version}"


def _steps(frame: pd.DataFrame) -> Iterator[pd.DataFrame]:
    """One frame per time step (every meter's reading at that time)."""
    for _, part in frame.groupby("ts", sort=True):
        yield part


def _publish(settings: Settings, frame: pd.DataFrame, steps_per_message: int = 24) -> None:
    from meterops.pipeline import Pipeline
    from meterops.types import ReadingBatch

    times = np.sort(frame["ts"].unique())
    with Pipeline(settings) as pipe:
        for lo in range(0, len(times), steps_per_message):
            window = frame[frame["ts"].isin(times[lo : lo + steps_per_message])]
            pipe.producer.send("readings", ReadingBatch.from_pandas(window).table)
        pipe.producer.flush()


def _store_history(settings: Settings, history: pd.DataFrame) -> None:
    """Readings before the stream, stored unscored (what a running system already holds)."""
    from meterops.pipeline import Pipeline

    plain = settings.model_copy(
        update={"scoring": settings.scoring.model_copy(update={"enabled": False})}
    )
    _publish(plain, history)
    with Pipeline(plain) as pipe:
        pipe.worker().run(until_idle=True)


def _drain_in_process(settings: Settings, warmup: pd.DataFrame, backlog: pd.DataFrame) -> float:
    """Seconds for one warmed-up worker to drain ``backlog`` from the bus.

    Warm-up, not timed: the worker joins the group, loads the champion,
    scores ``warmup`` (which reads every meter's stored history into its
    feature buffers and online learners) and waits for the compiled
    boosters; the steady state is what is timed.
    """
    from meterops.pipeline import Pipeline

    with Pipeline(settings) as pipe:
        worker = pipe.worker()
        worker._open()
        _publish(settings, warmup)
        while worker.step() is not None:
            pass
        worker.warm()
        _publish(settings, backlog)
        started = time.perf_counter()
        worker.run(until_idle=True)
        return time.perf_counter() - started


def _first_scored(settings: Settings) -> tuple[float, int]:
    """When the first reading was scored (epoch seconds) and how many were."""
    from meterops.pipeline import Pipeline

    with Pipeline(settings) as pipe:
        scores = pipe.store.scores()
    if scores.empty:
        return float("nan"), 0
    return float(scores["scored_at"].min()) / 1e6, len(scores)


def _drain_processes(settings: Settings, workers: int) -> float:
    """Readings/s of ``workers`` worker processes draining the bus.

    From the first reading scored (interpreter and model start-up are not
    counted) to the last batch committed by any process: a worker run with
    ``--until-idle`` prints a progress line right after each commit, and
    the bench notes when each line arrives (process shutdown is not counted
    either).
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "meterops", "worker", "--until-idle"],
            cwd=settings.project_dir,
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    committed = [0.0] * workers
    logs: list[list[str]] = [[] for _ in range(workers)]

    def follow(i: int) -> None:
        for line in procs[i].stderr or ():
            logs[i].append(line)
            if line.startswith("worker: ") and " readings (" in line:
                committed[i] = time.time()

    readers = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(workers)]
    for reader in readers:
        reader.start()
    for i, proc in enumerate(procs):
        proc.wait(timeout=1800)
        readers[i].join(timeout=60)
        if proc.returncode:
            text = "".join(logs[i])[-2000:]
            raise RuntimeError(f"a bench worker failed (exit {proc.returncode}):\n{text}")
    started, rows = _first_scored(settings)
    span = max(committed) - started
    return rows / span if span > 0 else float("nan")


def _serve(settings: Settings, stop: threading.Event, ready: threading.Event) -> None:
    """A worker in its own thread with its own connections (SQLite's are per thread)."""
    from meterops.pipeline import Pipeline

    with Pipeline(settings) as pipe:
        worker = pipe.worker()
        worker._open()
        while worker.step() is not None:  # the warm-up step already published
            pass
        worker.warm()
        ready.set()
        worker.run(stop=stop)


def _latency(settings: Settings, stream: pd.DataFrame, rate: float, seconds: float) -> np.ndarray:
    """Publish-to-stored latency (ms) of every reading sent at a steady ``rate``."""
    from meterops.pipeline import Pipeline
    from meterops.types import ReadingBatch

    sent: dict[pd.Timestamp, float] = {}
    steps = _steps(stream)
    _publish(settings, next(steps))  # warm-up (as in the throughput run), not measured
    stop, ready = threading.Event(), threading.Event()
    runner = threading.Thread(target=_serve, args=(settings, stop, ready), daemon=True)
    runner.start()
    ready.wait(timeout=300)
    meters = stream["meter_id"].nunique()
    interval = meters / rate
    with Pipeline(settings) as source:
        deadline = time.perf_counter() + seconds
        next_at = time.perf_counter()
        for step in steps:
            if time.perf_counter() >= deadline:
                break
            time.sleep(max(0.0, next_at - time.perf_counter()))
            source.producer.send("readings", ReadingBatch.from_pandas(step).table)
            source.producer.flush()
            sent[step["ts"].iloc[0]] = time.time()
            next_at += interval
        wait_until = time.monotonic() + 120
        while time.monotonic() < wait_until:
            if len(source.store.scores(start=max(sent))) >= meters:
                break
            time.sleep(0.05)
        stop.set()
        runner.join(timeout=120)
        scores = source.store.scores(start=min(sent))
    published = scores["ts"].map(sent).to_numpy(np.float64)
    stored = scores["scored_at"].to_numpy(np.float64) / 1e6
    latency = (stored - published) * 1000.0
    finite: np.ndarray = latency[np.isfinite(latency)]
    return finite


def bench_pipeline(
    meters: int = 1000,
    train_days: int = 30,
    backlog_days: int = 20,
    rate: float = 10_000.0,
    latency_seconds: float = 20.0,
    river_rows: int = 20_000,
    n_estimators: int = 100,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run every part (see the module docstring); returns the numbers as a dict."""
    from meterops.bench_online import online_rate, river_rate

    latency_days = int(np.ceil(latency_seconds * rate / meters / 24)) + 1
    days = train_days + 2 * backlog_days + latency_days
    progress(f"simulating {meters:,} meters x {days} days ...")
    fleet = _fleet(meters, days, seed)
    cut = fleet["ts"].min() + pd.Timedelta(days=train_days)
    train = fleet[fleet["ts"] < cut]
    history = train[train["ts"] >= cut - pd.Timedelta(days=_HISTORY_DAYS)]
    ends = [cut + pd.Timedelta(days=backlog_days * k) for k in (1, 2)]
    backlog = fleet[(fleet["ts"] >= cut) & (fleet["ts"] < ends[0])]
    steady = fleet[fleet["ts"] >= ends[1]]
    out: dict[str, Any] = {"meters": meters, "backlog_readings": len(backlog)}
    with tempfile.TemporaryDirectory(prefix="meterops-bench-pipeline-") as tmp:
        root = Path(tmp)
        main = _project(root / "main")
        progress(f"training the champion on {len(train):,} readings ...")
        t0 = time.perf_counter()
        out["champion"] = _champion(main, train, n_estimators)
        out["train_seconds"] = round(time.perf_counter() - t0, 2)
        progress(f"storing {len(history):,} readings of history ...")
        _store_history(main, history)

        first = backlog["ts"] == backlog["ts"].min()
        drains = []
        for k in range(_THROUGHPUT_RUNS):
            progress(f"throughput {k + 1}/{_THROUGHPUT_RUNS}: one worker drains {len(backlog):,}")
            project = main if k == 0 else _project(root / f"throughput{k}", registry=root / "main")
            if k:
                _store_history(project, history)
            drains.append(_drain_in_process(project, backlog[first], backlog[~first]))
        seconds, drained = float(np.median(drains)), int((~first).sum())
        out["readings_per_s"] = round(drained / seconds, 1)
        out["readings_per_s_runs"] = [round(drained / d, 1) for d in drains]
        out["throughput_seconds"] = round(seconds, 3)

        progress(f"latency: {rate:,.0f} readings/s for {latency_seconds:g} s ...")
        ms = _latency(main, steady, rate, latency_seconds)
        out["latency_rate"] = rate
        out["latency_readings"] = len(ms)
        out["p50_latency_ms"] = round(float(np.percentile(ms, 50)), 1) if len(ms) else None
        out["p99_latency_ms"] = round(float(np.percentile(ms, 99)), 1) if len(ms) else None

        second = fleet[(fleet["ts"] >= ends[0]) & (fleet["ts"] < ends[1])]
        for n in (1, 2):
            progress(f"scaling: {n} worker process(es) drain {len(second):,} readings ...")
            project = _project(root / f"workers{n}", registry=root / "main")
            recent = fleet["ts"] >= ends[0] - pd.Timedelta(days=_HISTORY_DAYS)
            _store_history(project, fleet[recent & (fleet["ts"] < ends[0])])
            _publish(project, second)
            out[f"workers_{n}_readings_per_s"] = round(_drain_processes(project, n), 1)
        out["scaling_2_vs_1"] = round(
            out["workers_2_readings_per_s"] / out["workers_1_readings_per_s"], 2
        )

    progress(f"reference: River learn_one/predict_one on {river_rows:,} readings ...")
    sample = fleet[fleet["ts"] >= cut - pd.Timedelta(days=_HISTORY_DAYS)]
    # the best of three: a single short run swung by a third from one run to the next
    runs = [river_rate(sample, limit_rows=river_rows) for _ in range(3)]
    river = max(runs, key=lambda run: run.readings_per_s)
    ours = online_rate(sample)
    out["reference"] = "river LinearRegression, same features, one reading at a time"
    out["reference_readings_per_s"] = round(river.readings_per_s, 1)
    out["ratio"] = round(out["readings_per_s"] / river.readings_per_s, 2)
    out["online_readings_per_s"] = round(ours.readings_per_s, 1)
    out["online_vs_river"] = round(ours.readings_per_s / river.readings_per_s, 2)
    out["river_rmse"] = river.rmse
    out["online_rmse"] = ours.rmse
    return out
