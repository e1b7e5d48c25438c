"""Backends under contract: one fixture per role, parametrized over implementations.

The embedded backends always run; the real services run under their markers
(``pytest -m kafka``, ``pytest -m postgres``) and are started by the session
fixtures in ``tests/service_fixtures.py``. The suites in this folder run
unchanged on every parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meterops.backends import make_bus, make_store
from meterops.bus.base import Bus
from meterops.settings import load_settings
from meterops.store.base import Store

BUSES = [
    pytest.param("local", id="local"),
    pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
]
STORES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("sqlite-rows", id="sqlite-rows"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def bus_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "kafka":
        return str(request.getfixturevalue("kafka_url"))
    return f"local://{tmp_path / 'bus'}"


def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    if request.param == "sqlite-rows":  # the row-by-row fallback of SQLite's column binding
        return f"sqlite://{tmp_path / 'store.db'}?bind=rows"
    return f"sqlite://{tmp_path / 'store.db'}"


@pytest.fixture(params=BUSES)
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bus]:
    settings = load_settings(
        None, project_dir=tmp_path, backends={"bus": bus_url(request, tmp_path)}
    )
    with make_bus(settings).open() as b:
        yield b


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    settings = load_settings(
        None, project_dir=tmp_path, backends={"store": store_url(request, tmp_path)}
    )
    with make_store(settings).open() as s:
        yield s
