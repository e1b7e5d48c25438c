"""The MLflow tracking server service: command and environment, and the registry on it.

The ``postgres`` tests run a real ``mlflow server`` on loopback over a
database of the session's PostgreSQL (the ``mlflow_service`` fixture, started
once: MLflow's imports and migrations take about 15 s) and drive
:class:`~meterops.registry.Registry` through it over HTTP. Each test keeps to
its own experiment and registered model, so they share the server.
"""

from __future__ import annotations

import importlib.util
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from meterops.errors import BackendError, MissingDependency, NotFound
from meterops.models.baselines import SeasonalNaive
from meterops.models.gbm import GBMForecaster
from meterops.registry import CHAMPION, Registry
from meterops.services import mlflow_server
from meterops.services.base import Service
from meterops.services.mlflow_server import MlflowServerService, sqlalchemy_uri
from tests.unit.test_registry import fleet, log, tiny_gbm

PG = "postgresql://app:s3cret@127.0.0.1:5432/mlflow"


# ---------------------------------------------------------------------- without a server


def test_postgres_urls_use_the_psycopg3_dialect() -> None:
    assert sqlalchemy_uri(PG) == "postgresql+psycopg://app:s3cret@127.0.0.1:5432/mlflow"
    assert sqlalchemy_uri("postgres://h/db") == "postgresql+psycopg://h/db"
    assert sqlalchemy_uri("postgresql+psycopg2://h/db") == "postgresql+psycopg2://h/db"
    assert sqlalchemy_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_command_binds_loopback_one_worker_and_keeps_the_password_off_argv(
    tmp_path: Path,
) -> None:
    service = MlflowServerService(tmp_path, PG, port=5055)
    argv = service.command()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5055"
    assert argv[argv.index("--workers") + 1] == "1"
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path / "artifacts")
    assert not any("s3cret" in arg for arg in argv)
    env = service.environment()
    assert env["MLFLOW_BACKEND_STORE_URI"] == sqlalchemy_uri(PG)
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["DO_NOT_TRACK"] == "true"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert service.url == "http://127.0.0.1:5055"


def test_not_started_has_no_url_and_stop_is_a_no_op(tmp_path: Path) -> None:
    service = MlflowServerService(tmp_path, PG)
    with pytest.raises(BackendError, match="not started"):
        _ = service.url
    service.stop()
    service.stop()
    assert not service.running()


def test_install_names_the_extra_when_mlflow_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in ("mlflow", "psycopg") else real(name, *args)

    monkeypatch.setattr(mlflow_server.importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependency, match=r"meterops\[registry\]"):
        MlflowServerService(tmp_path, PG).install()
    monkeypatch.setattr(
        mlflow_server.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "psycopg" else real(name, *a),
    )
    with pytest.raises(MissingDependency, match=r"meterops\[postgres\]"):
        MlflowServerService(tmp_path, PG).install()
    MlflowServerService(tmp_path, "sqlite:////tmp/m.db").install()  # no psycopg needed


# ---------------------------------------------------------------------- on a real server


def _tables(url: str, model_name: str, experiment: str) -> dict[str, int]:
    """Row counts of this test's experiment and model in MLflow's own PostgreSQL tables."""
    import psycopg

    queries = {
        "runs": "SELECT count(*) FROM runs r JOIN experiments e"
        " ON r.experiment_id = e.experiment_id WHERE e.name = %s",
        "registered_models": "SELECT count(*) FROM registered_models WHERE name = %s",
        "model_versions": "SELECT count(*) FROM model_versions WHERE name = %s",
        "champion": "SELECT coalesce(max(version), 0) FROM registered_model_aliases"
        " WHERE name = %s AND alias = 'champion'",
    }
    counts = {}
    with psycopg.connect(url) as conn:
        for table, sql in queries.items():
            row = conn.execute(sql, (experiment if table == "runs" else model_name,)).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


@pytest.fixture
def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"forecaster-{tag}", f"exp-{tag}"


@pytest.fixture
def server_registry(mlflow_url: str, names: tuple[str, str]) -> Iterator[Registry]:
    model_name, experiment = names
    with Registry(mlflow_url, model_name=model_name, experiment=experiment) as reg:
        yield reg


@pytest.mark.postgres
@pytest.mark.slow
def test_registry_round_trip_through_the_server_lands_in_postgres(
    mlflow_service: Service, server_registry: Registry, names: tuple[str, str]
) -> None:
    assert isinstance(mlflow_service, MlflowServerService)
    frame = fleet(days=8)
    gbm = tiny_gbm(n_estimators=5)
    v1 = log(server_registry, gbm, frame)
    v2 = log(server_registry, SeasonalNaive(period="1d"), frame)
    assert (v1, v2) == (1, 2)

    server_registry.promote(v1, "bootstrap")
    server_registry.promote(v2, "seasonal is better")
    back = server_registry.rollback("v2 misbehaves")
    assert (back.from_version, back.to_version) == (2, 1)
    assert server_registry.champion() == v1
    listed = server_registry.list()
    assert [v.version for v in listed] == [2, 1]
    assert listed[1].aliases == (CHAMPION,) and listed[1].metrics["rmse_h1"] > 0
    assert [r.action for r in server_registry.audit()] == ["promote", "promote", "rollback"]

    loaded = server_registry.load(CHAMPION)
    assert isinstance(loaded, GBMForecaster)
    pd.testing.assert_frame_equal(loaded.forecast(frame, 1), gbm.forecast(frame, 1))
    with pytest.raises(NotFound):
        server_registry.load(9)

    # The runs and models live in PostgreSQL, the model files behind the server.
    counts = _tables(mlflow_service.backend_store_uri, *names)
    assert counts == {"runs": 2, "registered_models": 1, "model_versions": 2, "champion": 1}
    run_dir = mlflow_service.artifacts_dir
    assert list(run_dir.rglob("forecaster.json")), "artifacts are stored by the server"


@pytest.mark.postgres
@pytest.mark.slow
def test_restarted_server_keeps_runs_models_and_artifacts(
    mlflow_service: Service, server_registry: Registry
) -> None:
    assert isinstance(mlflow_service, MlflowServerService)
    frame = fleet(days=6)
    version = log(server_registry, SeasonalNaive(period="1d"), frame)
    server_registry.promote(version, "first")
    url = mlflow_service.url

    started = time.perf_counter()
    mlflow_service.restart()
    assert time.perf_counter() - started < 60
    assert mlflow_service.url == url  # same port: clients keep their tracking URI

    with Registry(url, model_name=server_registry.model_name) as again:
        assert again.champion() == version
        [info] = again.list()
        assert info.run_id == server_registry.list()[0].run_id
        model = again.load(version)
        pd.testing.assert_frame_equal(
            model.forecast(frame, 2), SeasonalNaive(period="1d").fit(frame).forecast(frame, 2)
        )
