"""Session-scoped real services (installed on first use, started on loopback, stopped after).

``kafka_url`` and ``postgres_url`` give each test its own namespace on the
shared server (a topic prefix, a fresh database), so suites written for an
empty backend run unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterops.services.base import Service


@pytest.fixture(scope="session")
def kafka_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from meterops.services.kafka import KafkaService

    service = KafkaService(Path(tmp_path_factory.mktemp("kafka")))
    service.install()
    with service:
        yield service


@pytest.fixture(scope="session")
def postgres_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from meterops.services.postgres import PostgresService

    service = PostgresService(Path(tmp_path_factory.mktemp("postgres")))
    service.install()
    with service:
        yield service


@pytest.fixture
def kafka_url(kafka_service: Service) -> str:
    """The broker with a topic prefix of this test's own."""
    return f"{kafka_service.url}?prefix=t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def postgres_url(postgres_service: Service) -> str:
    """A fresh, empty database on the session's server."""
    from meterops.services.postgres import PostgresService

    assert isinstance(postgres_service, PostgresService)
    return postgres_service.create_database(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="session")
def mlflow_service(
    postgres_service: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """An MLflow tracking server over a database of the session's PostgreSQL."""
    from meterops.services.mlflow_server import MlflowServerService
    from meterops.services.postgres import PostgresService

    assert isinstance(postgres_service, PostgresService)
    database = postgres_service.create_database(f"mlflow_{uuid.uuid4().hex[:10]}")
    service = MlflowServerService(Path(tmp_path_factory.mktemp("mlflow")), database)
    service.install()
    with service:
        yield service


@pytest.fixture
def mlflow_url(mlflow_service: Service) -> str:
    """The session's tracking server URL; tests keep apart by experiment and model name."""
    return mlflow_service.url
