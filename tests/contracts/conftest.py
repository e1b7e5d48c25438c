"""Backends under contract: one fixture per role, parametrized over implementations.

A second backend is one more ``pytest.param`` here (with its marker); the
suites in this folder run unchanged on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meterops.bus.base import Bus
from meterops.bus.local import LocalBus
from meterops.store.base import Store
from meterops.store.sqlite import SQLiteStore


@pytest.fixture(params=[pytest.param("local", id="local")])
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bus]:
    if request.param == "local":
        with LocalBus(tmp_path / "bus", partitions=4).open() as b:
            yield b


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite")])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        with SQLiteStore(str(tmp_path / "store.db")).open() as s:
            yield s
