"""The scaled profile: a real Kafka broker and PostgreSQL server on loopback.

``meterops up --profile scaled`` and ``meterops bench ingest --profile scaled``
use this to run the same pipeline on the scale-out backends without any
external setup; against existing clusters, set the URLs in ``meterops.toml``
instead (see the README). With ``tracking=True`` an MLflow tracking server
also runs, its runs and models in a ``mlflow`` database of the same
PostgreSQL server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meterops.services.postgres import PostgresService

__all__ = ["PROFILES", "TRACKING_DATABASE", "scaled_stack"]

PROFILES = ("default", "scaled")
TRACKING_DATABASE = "mlflow"


def _tracking_database(postgres: PostgresService) -> str:
    """The URL of the ``mlflow`` database, created unless a reused cluster already has it."""
    import psycopg

    try:
        return postgres.create_database(TRACKING_DATABASE)
    except psycopg.errors.DuplicateDatabase:
        return f"{postgres.url.rpartition('/')[0]}/{TRACKING_DATABASE}"


@contextmanager
def scaled_stack(data_dir: Path, *, tracking: bool = False) -> Iterator[dict[str, str]]:
    """Install (first time), start Kafka and PostgreSQL under ``data_dir``; yield backend URLs.

    The dict holds ``bus`` and ``store`` (the ``[backends]`` settings); with
    ``tracking=True`` also ``tracking_uri``, the MLflow server's URL for
    ``[registry] tracking_uri`` (not a backend: pop it before passing the
    dict as ``backends``). Everything is stopped and its data deleted when
    the block exits.
    """
    from meterops.services.kafka import KafkaService
    from meterops.services.postgres import PostgresService

    kafka = KafkaService(data_dir / "kafka")
    postgres = PostgresService(data_dir / "postgres", fast=False)
    kafka.install()
    postgres.install()
    with ExitStack() as stack:
        stack.enter_context(kafka)
        stack.enter_context(postgres)
        urls = {"bus": kafka.url, "store": postgres.url}
        if tracking:
            from meterops.services.mlflow_server import MlflowServerService

            server = MlflowServerService(data_dir / "mlflow", _tracking_database(postgres))
            server.install()
            stack.enter_context(server)
            urls["tracking_uri"] = server.url
        yield urls
