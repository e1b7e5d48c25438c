"""``python -m meterops.services install``: install the real services tests and ``up`` use.

Idempotent: PostgreSQL from Debian's packages (if missing), the Kafka broker's
jars from Maven Central (if not cached). ``make test`` runs it first so no
test spends its time limit on a download.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    if argv != ["install"]:
        print("usage: python -m meterops.services install", file=sys.stderr)
        return 2
    from meterops.services.kafka import KafkaService
    from meterops.services.postgres import PostgresService

    with tempfile.TemporaryDirectory() as tmp:
        for service in (PostgresService(Path(tmp) / "pg"), KafkaService(Path(tmp) / "kafka")):
            print(f"installing {type(service).__name__} ...", flush=True)
            service.install()
    print("services installed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
