"""A single-node Apache Kafka broker (KRaft) on loopback, for tests and ``up --profile scaled``.

There is no Kafka broker in Debian or on PyPI, so :meth:`KafkaService.install`
resolves the broker's jars from Maven Central once, with the small POM shipped
next to this module (``kafka-broker.pom.xml``), into
``~/.cache/meterops/kafka-<version>/libs``. :meth:`KafkaService.start` runs one
JVM that is both controller and broker (``process.roles=broker,controller``),
listening on 127.0.0.1 only, with its log directory in ``data_dir``; the
storage is formatted once with a random cluster id, so a restart resumes the
same data on the same ports.

:func:`produce_consume_ceiling` measures what confluent-kafka alone achieves
against a broker (no Arrow, no meterops): the service ceiling
``meterops bench ingest --profile scaled`` prints beside the pipeline rate.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import IO, Any

from meterops.errors import BackendError, Unavailable
from meterops.services.base import Service, cache_dir, free_port

__all__ = ["KAFKA_VERSION", "KafkaService", "produce_consume_ceiling"]

KAFKA_VERSION = "4.4.0"
_POM = "kafka-broker.pom.xml"
_MARKER = ".installed"
_START_TIMEOUT = 90.0
_STOP_TIMEOUT = 30.0

log = logging.getLogger(__name__)

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def _cluster_id() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class KafkaService(Service):
    """One Kafka broker + controller process on 127.0.0.1 (see the module docstring).

    ``port`` is the client port (a free one by default); the controller quorum
    listens on a second free port. Both are chosen at the first ``start`` and
    kept by ``restart``.
    """

    name = "kafka"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.controller_port: int | None = None
        self.version = version
        self.heap = heap
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- install -------------------------------------------------------------
    @property
    def home(self) -> Path:
        """Where this version's jars live (``<home>/libs``)."""
        return cache_dir() / f"kafka-{self.version}"

    @property
    def installed(self) -> bool:
        return (self.home / _MARKER).exists()

    def install(self) -> None:
        """Resolve the broker jars from Maven Central with ``mvn`` (once; later a no-op)."""
        if self.installed:
            return
        mvn, java = shutil.which("mvn"), shutil.which("java")
        if mvn is None or java is None:
            raise BackendError(
                "installing Kafka needs Maven and a Java 17+ runtime on PATH "
                "(Debian: apt-get install maven openjdk-17-jre-headless)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.home / ".install.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing right now
            if self.installed:
                return
            libs = self.home / "libs"
            staging = Path(tempfile.mkdtemp(prefix="libs.", dir=self.home))
            try:
                pom = staging / "pom.xml"
                pom.write_bytes(resources.files("meterops.services").joinpath(_POM).read_bytes())
                cmd = [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(pom),
                    f"-Dkafka.version={self.version}",
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={staging / 'libs'}",
                ]
                log.info("installing Kafka %s jars from Maven Central", self.version)
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
                if done.returncode != 0 or not any((staging / "libs").glob("kafka_2.13-*.jar")):
                    raise BackendError(
                        f"could not resolve the Kafka {self.version} jars with Maven "
                        f"({' '.join(cmd)}):\n{(done.stdout + done.stderr)[-3000:]}"
                    )
                shutil.rmtree(libs, ignore_errors=True)
                (staging / "libs").replace(libs)
                (self.home / _MARKER).write_text(self.version, encoding="utf-8")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            os.close(lock)

    # -- lifecycle -------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise BackendError("the Kafka service has not been started yet")
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        """``host:port`` for a Kafka client."""
        return self.url.removeprefix("kafka://")

    @property
    def log_path(self) -> Path:
        return self.data_dir / "kafka.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        assert self.port is not None and self.controller_port is not None  # noqa: S101
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            # One node: every internal topic has one replica, and few partitions
            # so the first consumer group does not wait for 50 to be created.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            # message.max.bytes stays at the default (1 MB): the bus splits its
            # messages, so it works on a default-configured cluster.
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2, encoding="utf-8")
        return path

    def _java(self, main: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BackendError(
                "Kafka needs a Java 17+ runtime on PATH "
                "(Debian: apt-get install openjdk-17-jre-headless)"
            )
        return [
            java,
            f"-Xmx{self.heap}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{self.home / 'libs'}/*",
            main,
            *args,
        ]

    def _format(self, config: Path) -> None:
        """Format the log directory once (KRaft needs a cluster id before the first start)."""
        if (self.data_dir / "logs" / "meta.properties").exists():
            return
        cmd = self._java(
            "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config)
        )
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            said = (done.stdout + done.stderr)[-3000:]
            raise BackendError(f"formatting Kafka storage failed (exit {done.returncode}):\n{said}")

    def start(self) -> KafkaService:
        """Start the broker (formatting storage the first time) and wait until it serves."""
        if self.running:
            return self
        self.install()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        if self.controller_port is None:
            self.controller_port = free_port()
            while self.controller_port == self.port:  # pragma: no cover - unlikely
                self.controller_port = free_port()
        config = self._write_config()
        self._format(config)
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(  # noqa: S603
            self._java("kafka.Kafka", str(config)),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_ready(_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until the broker can host a new partition (not just an open port).

        A metadata answer is not enough: a KRaft broker that restarts stays
        "fenced" until the controller has seen it catch up, and until then
        every topic creation fails with INVALID_REPLICATION_FACTOR. A
        validate-only creation runs the controller's replica placement
        without creating anything, so it succeeds exactly when that is over.
        """
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "logger": logging.getLogger(f"{__name__}.client"),
            "reconnect.backoff.max.ms": 200,
        }
        admin = AdminClient(config)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise BackendError(
                    f"Kafka exited while starting; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if admin.list_topics(timeout=1.0).brokers:
                    probe = NewTopic("meterops-readiness-probe", 1, 1)
                    futures = admin.create_topics([probe], validate_only=True, request_timeout=1.0)
                    futures[probe.topic].result()
                    return
            except KafkaException:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"Kafka did not answer on {self.bootstrap} within {timeout:.0f} s; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL after a timeout; the data stays."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def produce_consume_ceiling(
    bootstrap: str,
    payloads: list[bytes],
    rows_per_payload: list[int],
    *,
    partitions: int = 4,
    config: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Raw confluent-kafka rates for ``payloads``: produce, consume back, and both.

    Produces the payloads round-robin over the partitions of a fresh topic
    with the producer settings of the bus (idempotent, ``acks=all``, lz4),
    flushes, then reads every message back with a group-less consumer, and
    deletes the topic. Rates are rows per second, where ``rows_per_payload``
    says how many rows each payload stands for; ``round_trip_rows_per_s`` is
    rows / (produce + consume time).
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer
    from confluent_kafka import TopicPartition as KafkaPartition
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    if len(payloads) != len(rows_per_payload):
        raise ValueError("payloads and rows_per_payload differ in length")
    base: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        **(config or {}),
        "logger": logging.getLogger(f"{__name__}.client"),
    }
    biggest = max((len(p) for p in payloads), default=0)
    limit = max(1_000_000, biggest + 65_536)
    topic = f"meterops-ceiling-{uuid.uuid4().hex[:12]}"
    admin = AdminClient(dict(base))
    try:
        futures = admin.create_topics(
            [NewTopic(topic, partitions, 1, config={"max.message.bytes": str(2 * limit)})]
        )
        futures[topic].result()
        while topic not in admin.list_topics(topic, timeout=5).topics:  # pragma: no cover
            time.sleep(0.05)
    except KafkaException as exc:
        raise Unavailable(f"cannot create a benchmark topic on {bootstrap}: {exc}") from exc
    try:
        producer = Producer(
            {
                **base,
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "lz4",
                "linger.ms": 5,
                "message.max.bytes": limit,
                "batch.size": limit,
            }
        )
        failures: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        producer.list_topics(topic, timeout=10)  # connect before the clock starts
        t0 = time.perf_counter()
        for i, payload in enumerate(payloads):
            while True:
                try:
                    producer.produce(
                        topic, payload, partition=i % partitions, on_delivery=delivered
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        if producer.flush(300) or failures:
            raise BackendError(f"benchmark messages not delivered: {failures[:3]}")
        produce_s = time.perf_counter() - t0

        consumer = Consumer(
            {
                **base,
                "group.id": f"meterops-ceiling-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 100,
            }
        )
        try:
            consumer.list_topics(topic, timeout=10)  # connect before the clock starts
            consumer.assign([KafkaPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
            t0 = time.perf_counter()
            seen = 0
            deadline = time.monotonic() + 300
            while seen < len(payloads) and time.monotonic() < deadline:
                # consume(n, t) waits for n messages or t: ask for what is left
                for msg in consumer.consume(min(1000, len(payloads) - seen), 1.0):
                    if msg.error() is None:
                        seen += 1
            consume_s = time.perf_counter() - t0
        finally:
            consumer.close()
        if seen < len(payloads):
            raise BackendError(f"read back {seen} of {len(payloads)} benchmark messages")
    finally:
        with contextlib.suppress(Exception):
            admin.delete_topics([topic])[topic].result()
    rows = float(sum(rows_per_payload))
    size = float(sum(len(p) for p in payloads))
    return {
        "messages": float(len(payloads)),
        "rows": rows,
        "bytes": size,
        "produce_s": produce_s,
        "consume_s": consume_s,
        "produce_rows_per_s": rows / produce_s if produce_s else 0.0,
        "consume_rows_per_s": rows / consume_s if consume_s else 0.0,
        "round_trip_rows_per_s": rows / (produce_s + consume_s) if produce_s + consume_s else 0.0,
        "produce_mb_per_s": size / produce_s / 1e6 if produce_s else 0.0,
        "consume_mb_per_s": size / consume_s / 1e6 if consume_s else 0.0,
    }
