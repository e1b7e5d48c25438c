"""The scaled profile: a real Kafka broker and PostgreSQL server on loopback.

``meterops up --profile scaled`` and ``meterops bench ingest --profile scaled``
use this to run the same pipeline on the scale-out backends without any
external setup; against existing clusters, set the URLs in ``meterops.toml``
instead (see the README).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

__all__ = ["PROFILES", "scaled_stack"]

PROFILES = ("default", "scaled")


@contextmanager
def scaled_stack(data_dir: Path) -> Iterator[dict[str, str]]:
    """Install (first time), start Kafka and PostgreSQL under ``data_dir``; yield backend URLs.

    Both are stopped and their data deleted when the block exits.
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
        yield {"bus": kafka.url, "store": postgres.url}
