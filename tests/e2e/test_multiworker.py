"""Two ``meterops worker`` processes in one group share the partitions; one stops, one takes over.

Readings flow the whole time: a publisher thread in the test sends them in
small timed chunks while both workers run, goes on sending while one worker
is stopped (SIGTERM: a clean exit; ``kill -9``: no goodbye at all) until the
survivor owns every partition, and then sends the rest. The store must end
with exactly the unique valid readings and each rejected one dead-lettered
once, whatever was redelivered on the way.

Who owns what is read from the bus (``Bus.group_members``) and from the
workers' own log lines (INFO on ``meterops.bus``, enabled here by starting
the CLI with logging configured).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pytest

from meterops.backends import make_bus
from meterops.bus.base import READINGS, Bus, TopicPartition
from meterops.pipeline import Pipeline
from meterops.settings import Settings, load_settings
from meterops.types import ReadingBatch
from tests.e2e.conftest import Run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# `meterops worker` with the bus's INFO lines on stderr (the CLI itself logs warnings only).
WORKER = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s %(message)s'); "
    "logging.getLogger('meterops.bus').setLevel(logging.INFO); "
    "from meterops.cli import main; main()"
)
METERS, STEPS, CHUNK_STEPS = 60, 480, 4  # 120 chunks of 240 readings
INVALID, REPEATS = 150, 400


def stream(meters: int = METERS, steps: int = STEPS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all rows in time order: valid, exact repeats and out-of-range values; the valid ones)."""
    rng = np.random.default_rng(11)
    ts = pd.date_range("2024-03-01", periods=steps, freq="h", tz="UTC")
    truth = pd.DataFrame(
        {
            "meter_id": np.repeat([f"w-{i:03d}" for i in range(meters)], steps),
            "ts": np.tile(ts, meters),
            "value": rng.gamma(2.0, 1.0, meters * steps).round(4),
        }
    )
    repeats = truth.sample(REPEATS, random_state=1)
    invalid = truth.sample(INVALID, random_state=2).assign(value=5e7)
    rows = pd.concat([truth, repeats, invalid], ignore_index=True)
    return rows.sort_values("ts", kind="stable").reset_index(drop=True), truth


class Publisher(threading.Thread):
    """Sends chunks: ``head`` of them 0.1 s apart, then one per ``interval`` until ``release``."""

    def __init__(self, settings: Settings, rows: pd.DataFrame, head: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        steps = rows["ts"].rank(method="dense").astype(int) - 1
        self.chunks = [
            ReadingBatch.from_pandas(part.reset_index(drop=True))
            for _, part in rows.groupby(steps // CHUNK_STEPS, sort=True)
        ]
        self.head = head
        self.interval = interval
        self.release = threading.Event()
        self.sent = 0  # chunks
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Pipeline(self.settings) as pipe:
                for i, chunk in enumerate(self.chunks):
                    for _ in pipe.publish([chunk]):
                        pass
                    self.sent += 1
                    if i >= self.head and not self.release.is_set():
                        self.release.wait(self.interval)
                    elif i < self.head:
                        time.sleep(0.1)
        except BaseException as exc:  # re-raised by finish()
            self.error = exc

    def finish(self) -> None:
        self.release.set()
        self.join(timeout=120)
        assert not self.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error


class WorkerProcess:
    """A ``meterops worker`` subprocess, its output in files next to the project."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        self._out: IO[str] = self.out_path.open("w")
        self._err: IO[str] = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, "worker", "--batch-rows", "2000"],
            cwd=workdir,
            stdout=self._out,
            stderr=self._err,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.err_path.read_text()

    def processed(self) -> bool:
        """The CLI reports its first micro-batch at once."""
        return re.search(r"worker: [\d,]+ readings", self.log()) is not None

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._out.close()
        self._err.close()


def without_scoring(workdir: Path) -> None:
    """Workers only validate and store here: scoring (model registry start-up) is not on trial."""
    config = workdir / "meterops.toml"
    text = config.read_text()
    config.write_text(re.sub(r"(?ms)^(\[scoring\][^\[]*?^enabled = )true", r"\1false", text))


def owners(bus: Bus, group: str) -> dict[int, set[TopicPartition]]:
    """Partitions per worker process id (member ids start with it, after ``meterops-`` on Kafka)."""
    out: dict[int, set[TopicPartition]] = {}
    for member, partitions in bus.group_members(group).items():
        match = re.match(r"(?:meterops-)?(\d+)-", member)
        assert match, member
        out.setdefault(int(match.group(1)), set()).update(partitions)
    return out


def wait_for(what: str, done: Callable[[], bool], deadline: float) -> None:
    """Until ``done()`` holds; fails the test with ``what`` after ``deadline`` s."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > deadline:
            raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_two_workers_share_partitions_and_the_survivor_takes_over(
    profile: str, workdir: Path, cli: Run, stop: signal.Signals
) -> None:
    without_scoring(workdir)
    rows, truth = stream()
    settings = load_settings(workdir / "meterops.toml")
    group = settings.worker.group
    bus = make_bus(settings).open()
    bus.create_topics([READINGS])
    everything = {(READINGS, p) for p in range(len(bus.end_offsets(READINGS)))}
    publisher = Publisher(settings, rows, head=12, interval=0.25)
    workers = [WorkerProcess(workdir, "worker-a"), WorkerProcess(workdir, "worker-b")]
    leaving, survivor = workers
    try:
        # Both join and split the partitions between them before any reading is sent.
        def split() -> bool:
            own = owners(bus, group)
            shares = [own.get(w.pid, set()) for w in workers]
            return all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == everything

        wait_for("both workers to own a share of the partitions", split, 45)
        shares = {w.pid: owners(bus, group)[w.pid] for w in workers}
        publisher.start()
        wait_for(
            "both workers to process readings", lambda: all(w.processed() for w in workers), 30
        )
        for w in workers:
            listed = ", ".join(f"{t}/{p}" for t, p in sorted(shares[w.pid]))
            assert f"assigned partitions {listed}" in w.log(), w.log()

        # One stops while readings keep coming; the other takes over every partition.
        assert publisher.sent < len(publisher.chunks), "the stream ended before the stop"
        stopped_at = time.monotonic()
        code = leaving.stop(stop)
        assert code == (0 if stop == signal.SIGTERM else -signal.SIGKILL), leaving.log()
        wait_for(
            "the survivor to own every partition",
            lambda: owners(bus, group) == {survivor.pid: everything},
            60,
        )
        takeover = time.monotonic() - stopped_at
        assert publisher.sent < len(publisher.chunks), "readings stopped flowing before takeover"
        publisher.finish()
        all_partitions = ", ".join(f"{t}/{p}" for t, p in sorted(everything))
        assert f"assigned partitions {all_partitions}" in survivor.log(), survivor.log()
        if stop == signal.SIGTERM:
            assert "assigned partitions none" in leaving.log(), leaving.log()
        print(f"{profile} {stop.name}: survivor owned all partitions {takeover:.1f} s after")

        # The survivor catches up: nothing waiting, then a clean exit.
        with Pipeline(settings) as pipe:
            wait_for("the survivor to catch up", lambda: pipe.status()["lag"] == 0, 60)
        assert survivor.stop(signal.SIGTERM) == 0, survivor.log()
    finally:
        publisher.release.set()
        for w in workers:
            w.close()
            print(f"--- {w.name} (pid {w.pid}) stderr, last lines:\n{w.log()[-3000:]}")
        bus.close()
    status = json.loads(cli("status", "--format", "json").stdout)
    assert status["lag"] == 0
    assert status["readings"] == len(truth)
    assert status["deadletters_by_reason"] == {"value out of range": INVALID}
    with Pipeline(settings) as pipe:
        stored = pipe.store.readings().to_pandas()
    assert len(stored) == len(truth)
    assert not stored.duplicated(["meter_id", "ts"]).any()
    merged = truth.merge(stored, on=["meter_id", "ts"], suffixes=("", "_stored"))
    assert len(merged) == len(truth) and (merged["value"] == merged["value_stored"]).all()
