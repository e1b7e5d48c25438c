"""Run the real CLI in subprocesses against a temporary project."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meterops.settings import DEFAULT_TOML

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "meterops.toml").write_text(
        DEFAULT_TOML.replace("poll_timeout = 0.5", "poll_timeout = 0.1")
    )
    return tmp_path


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "meterops", *args]


@pytest.fixture
def cli(workdir: Path) -> Run:
    def run(
        *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            cli_command(*args), cwd=workdir, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"meterops {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


PROFILES = [
    pytest.param("embedded", id="embedded"),
    pytest.param("scaled", id="kafka+postgres", marks=[pytest.mark.kafka, pytest.mark.postgres]),
]


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest, workdir: Path) -> str:
    """Run the test on the embedded backends and on a real Kafka + PostgreSQL."""
    if request.param == "scaled":
        point_at(
            workdir, request.getfixturevalue("kafka_url"), request.getfixturevalue("postgres_url")
        )
    return str(request.param)


def point_at(workdir: Path, bus: str, store: str) -> None:
    """Make the project's config use these bus and store URLs."""
    config = workdir / "meterops.toml"
    text = config.read_text()
    text = text.replace('bus = "local://.meterops/bus"', f'bus = "{bus}"')
    text = text.replace('store = "sqlite:///.meterops/meterops.db"', f'store = "{store}"')
    config.write_text(text)
