"""Service faults mid-stream on Kafka + PostgreSQL: reconnect, retry, lose nothing."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from meterops.services.base import Service
from tests.e2e.conftest import Run, cli_command, point_at
from tests.e2e.test_crash_recovery import stream_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.kafka, pytest.mark.postgres]


def run_with_outage(workdir: Path, cli: Run, service: Service, outage: float) -> dict[str, object]:
    """Replay and a worker run while ``service`` goes down for ``outage`` s; final status."""
    truth = stream_file(workdir / "stream.csv", meters=50, steps=400)
    replay = subprocess.Popen(cli_command("replay", "stream.csv", "--speed", "240000"), cwd=workdir)
    worker = subprocess.Popen(cli_command("worker", "--batch-rows", "2000"), cwd=workdir)
    try:
        time.sleep(2.0)
        service.stop()
        time.sleep(outage)
        service.start()
        assert replay.wait(timeout=300) == 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = json.loads(cli("status", "--format", "json").stdout)
            if status["lag"] == 0 and status["readings"] >= len(truth):
                break
            time.sleep(0.5)
        assert worker.poll() is None, "the worker died instead of retrying"
    finally:
        for proc in (worker, replay):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    assert status["readings"] == len(truth)
    assert status["deadletters_by_reason"] == {
        "duplicate with a different value": 300,
        "value out of range": 200,
    }
    return status


def test_broker_restart_mid_stream(
    workdir: Path, cli: Run, kafka_service: Service, kafka_url: str, postgres_url: str
) -> None:
    point_at(workdir, kafka_url, postgres_url)
    run_with_outage(workdir, cli, kafka_service, outage=5.0)


def test_postgres_restart_mid_stream(
    workdir: Path, cli: Run, postgres_service: Service, kafka_url: str, postgres_url: str
) -> None:
    point_at(workdir, kafka_url, postgres_url)
    run_with_outage(workdir, cli, postgres_service, outage=5.0)


def test_a_replay_started_while_the_broker_is_down_waits_for_it(
    workdir: Path, cli: Run, kafka_service: Service, kafka_url: str, postgres_url: str
) -> None:
    point_at(workdir, kafka_url, postgres_url)
    truth = stream_file(workdir / "stream.csv", meters=20, steps=48)
    kafka_service.stop()
    try:
        replay = subprocess.Popen(
            cli_command("replay", "stream.csv"), cwd=workdir, stderr=subprocess.PIPE, text=True
        )
        time.sleep(20.0)  # longer than one connection attempt waits (15 s)
        assert replay.poll() is None, "replay gave up instead of waiting for the broker"
    finally:
        kafka_service.start()
    _, stderr = replay.communicate(timeout=300)
    assert replay.returncode == 0, stderr
    assert "bus unavailable" in stderr  # it said what it waits for
    cli("worker", "--until-idle")
    status = json.loads(cli("status", "--format", "json").stdout)
    assert status["readings"] == len(truth)  # every row was sent once the broker came back
