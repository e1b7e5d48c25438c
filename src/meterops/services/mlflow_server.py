"""An MLflow tracking server on loopback, its runs and models in a SQL database.

``MlflowServerService(data_dir, "postgresql://user@host:5432/mlflow")`` runs
``python -m mlflow server`` on 127.0.0.1 with one uvicorn worker (the lowest
memory) and MLflow's background job runner off. The backend store URI is
passed through the environment, not the command line, so a password in it
never shows in the process list; ``postgresql://`` URLs are given to MLflow's
SQLAlchemy as ``postgresql+psycopg://`` (the psycopg 3 driver meterops uses).
MLflow creates or migrates its tables on start (seconds on an empty
database).

The server proxies artifacts (``--serve-artifacts``): clients upload and
download model files over HTTP and they are kept in ``data_dir/artifacts``;
the server's output goes to ``data_dir/mlflow.log``. Point the registry at it
with ``[registry] tracking_uri = "<url>"`` (``url`` is ``http://127.0.0.1:P``).

``stop`` keeps the database and the artifacts, so ``start`` resumes with the
same runs and models; ``cleanup`` deletes ``data_dir`` but not the database,
which belongs to whoever created it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from meterops.errors import BackendError, MissingDependency
from meterops.services.base import Service, free_port
from meterops.settings import redact_url

__all__ = ["MlflowServerService", "sqlalchemy_uri"]

# Imported by ``mlflow server`` itself: the web app, the SQL store and its migrations.
_SERVER_MODULES = ("mlflow", "flask", "fastapi", "uvicorn", "sqlalchemy", "alembic")
_STOP_GRACE_S = 15.0


def sqlalchemy_uri(url: str) -> str:
    """``url`` as MLflow's SQLAlchemy backend store URI (psycopg 3 for PostgreSQL).

    >>> sqlalchemy_uri("postgresql://postgres@127.0.0.1:5432/mlflow")
    'postgresql+psycopg://postgres@127.0.0.1:5432/mlflow'
    >>> sqlalchemy_uri("sqlite:////tmp/mlflow.db")
    'sqlite:////tmp/mlflow.db'
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return url


def _is_postgres(uri: str) -> bool:
    return uri.partition("://")[0].split("+")[0] in ("postgresql", "postgres")


class MlflowServerService(Service):
    """``mlflow server`` on 127.0.0.1 over ``backend_store_uri`` (see the module docstring).

    ``backend_store_uri`` must name an existing database (e.g. one made by
    :meth:`PostgresService.create_database`); MLflow creates its tables in
    it. ``port`` defaults to a free port chosen at the first ``start`` and
    kept by ``restart``. ``start_timeout`` bounds the wait for ``/health``,
    which includes MLflow's schema migrations on a new database.
    """

    name = "mlflow"

    def __init__(
        self,
        data_dir: Path,
        backend_store_uri: str,
        port: int | None = None,
        *,
        start_timeout: float = 180.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.backend_store_uri = backend_store_uri
        self.port = port
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------
    @property
    def artifacts_dir(self) -> Path:
        """Where the server keeps the artifacts (model files) clients upload."""
        return self.data_dir / "artifacts"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "mlflow.log"

    @property
    def url(self) -> str:
        """The tracking URI clients use: ``http://127.0.0.1:<port>``."""
        if self.port is None:
            raise BackendError("the MLflow server is not started: call start() first")
        return f"http://127.0.0.1:{self.port}"

    # -- install -------------------------------------------------------------
    def install(self) -> None:
        """Check that MLflow's server (and psycopg for PostgreSQL) can be imported.

        Nothing is downloaded: the server comes with the ``registry`` extra.
        Raises :class:`MissingDependency` naming the extra to install.
        """
        for module in _SERVER_MODULES:
            if importlib.util.find_spec(module) is None:
                raise MissingDependency("mlflow", "registry")
        if _is_postgres(self.backend_store_uri) and importlib.util.find_spec("psycopg") is None:
            raise MissingDependency("psycopg", "postgres")

    # -- lifecycle -----------------------------------------------------------
    def command(self) -> list[str]:
        """The server's argv (the backend store URI travels in the environment)."""
        if self.port is None:
            raise BackendError("the MLflow server has no port yet: call start() first")
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts_dir),
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: ours plus the store URI, telemetry and jobs off."""
        env = dict(os.environ)
        env.update(
            {
                "MLFLOW_BACKEND_STORE_URI": sqlalchemy_uri(self.backend_store_uri),
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
                # The job runner is a second process (huey) only GenAI features need.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def running(self) -> bool:
        """Whether the server process this object started is still alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server (if not running) and wait until ``GET /health`` answers.

        Raises :class:`BackendError` with the tail of the server log when it
        exits or does not answer within ``start_timeout`` seconds.
        """
        if self.running():
            return self
        self.install()
        if self.port is None:
            self.port = free_port()
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n--- starting mlflow server on {self.url}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    cwd=self.data_dir,
                    start_new_session=True,  # its own process group: stop() ends the workers
                )
            except OSError as exc:
                raise BackendError(f"cannot start the MLflow server: {exc}") from exc
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        health = f"{self.url}/health"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BackendError(
                    f"the MLflow server exited ({self._proc.returncode}) on start "
                    f"(store {redact_url(self.backend_store_uri)})\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(health, timeout=2) as answer:  # noqa: S310 - loopback http
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise BackendError(
            f"the MLflow server did not answer {health} in {self.start_timeout:.0f} s\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "server log:\n" + text[-3000:]

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after 15 s; safe twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout=_STOP_GRACE_S)
        # The uvicorn worker may outlive the CLI process that forwarded the signal.
        self._signal(proc, signal.SIGKILL)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def cleanup(self) -> None:
        """Stop and delete ``data_dir`` (artifacts, log); the database is left alone."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
