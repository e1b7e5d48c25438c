"""The worker's writer process: same results as the thread, and a dead child loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from multiprocessing import Pipe
from typing import Any

import pytest

from meterops.errors import BackendError
from meterops.pipeline import Pipeline, ProcessWriter, make_writer
from meterops.settings import Settings, load_settings
from meterops.writer_process import _answer
from tests.helpers import readings
from tests.unit.test_pipeline import with_bad_rows


def _drained(settings: Settings) -> dict[str, Any]:
    with Pipeline(settings) as pipe:
        list(pipe.publish([with_bad_rows(), readings(meters=4, steps=30)]))
        pipe.worker().run(until_idle=True)
        status = pipe.status()
        stored = pipe.store.readings()
        return {
            "status": {k: status[k] for k in ("readings", "deadletters", "lag", "meters")},
            "readings": stored.to_pandas().sort_values(["meter_id", "ts"]).reset_index(drop=True),
            "lake": pipe.lake.read().num_rows,
        }


def test_a_writer_process_stores_what_a_writer_thread_stores(
    make_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
) -> None:
    by_process = _drained(make_settings(worker={"poll_timeout": 0.05, "writer": "process"}))
    other = tmp_path_factory.mktemp("thread")
    by_thread = _drained(
        load_settings(None, project_dir=other, worker={"poll_timeout": 0.05, "writer": "thread"})
    )
    assert by_process["status"] == by_thread["status"]
    # the first batch's 15 good rows share keys with the second's 120 (conflicting
    # values among them go to the dead letters, with the 4 bad rows)
    assert by_process["status"]["readings"] == 120 and by_process["status"]["lag"] == 0
    assert by_process["status"]["deadletters"] > 4
    assert by_process["lake"] == by_thread["lake"] == 120
    assert by_process["readings"].equals(by_thread["readings"])


def test_auto_takes_a_process_for_a_sqlite_file_and_a_thread_otherwise(
    make_settings: Callable[..., Settings],
) -> None:
    on_file = make_writer(make_settings(), lambda: None)
    try:
        assert isinstance(on_file, ProcessWriter)
        on_file.ready(timeout=120)
    finally:
        on_file.close()
    for store in ("sqlite://:memory:", "postgresql://u@127.0.0.1:1/db"):
        writer = make_writer(make_settings(backends={"store": store}), lambda: None)
        assert not isinstance(writer, ProcessWriter)
        writer.close()


def test_a_dead_writer_process_fails_the_batch_and_the_next_worker_stores_it_once(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(worker={"poll_timeout": 0.05, "writer": "process"})
    with Pipeline(settings) as pipe:
        list(pipe.publish([with_bad_rows()]))
        worker = pipe.worker()
        worker._open()
        worker.warm()
        writer = worker._writer
        assert isinstance(writer, ProcessWriter)
        writer._proc.kill()
        writer._proc.wait()
        with pytest.raises(BackendError, match="writer process died"):
            worker.run(until_idle=True)
        assert pipe.status()["lag"] == 19  # nothing committed
        assert pipe.status()["readings"] == 0
        totals = pipe.worker().run(until_idle=True)
        status = pipe.status()
    assert totals.stored == 15 and status["readings"] == 15 and status["deadletters"] == 4
    assert status["lag"] == 0


class _Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle this")


def test_an_error_that_cannot_be_pickled_reaches_the_parent_as_text() -> None:
    parent, child = Pipe()
    _answer(child, ("error", _Unpicklable("disk on fire"), 2))
    kind, exc, retries = parent.recv()
    assert (kind, retries) == ("error", 2)
    assert isinstance(exc, RuntimeError) and str(exc) == "_Unpicklable: disk on fire"


def test_the_writer_process_outlives_ctrl_c_and_sigterm_sent_to_the_group(
    make_settings: Callable[..., Settings],
) -> None:
    """The worker stops on them by finishing its pending write, which needs the child."""
    settings = make_settings(worker={"poll_timeout": 0.05, "writer": "process"})
    with Pipeline(settings) as pipe:
        list(pipe.publish([with_bad_rows()]))
        worker = pipe.worker()
        worker._open()
        worker.warm()
        writer = worker._writer
        assert isinstance(writer, ProcessWriter)
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(writer._proc.pid, sig)
        with pytest.raises(subprocess.TimeoutExpired):
            writer._proc.wait(timeout=0.5)
        totals = worker.run(until_idle=True)
        assert totals.stored == 15 and pipe.status()["lag"] == 0
        assert writer._proc.returncode == 0  # ended when the worker closed its pipe
