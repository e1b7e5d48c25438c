"""The scale-out bus: Apache Kafka through confluent-kafka (librdkafka).

URL: ``kafka://host:port[,host:port...][?prefix=P&max_message_rows=N&max_message_bytes=B]``.
Every meterops topic ``t`` is the Kafka topic ``P + t``; ``settings.bus.kafka``
holds librdkafka settings (SASL, SSL, timeouts, ...) given to the producer,
the consumers and the admin client alike. The keys that carry the bus's
promises (``acks``, idempotence, offset commits, ``group.id``) are set here
and cannot be overridden.

What a Kafka message holds: the rows of one ``send`` that belong to ONE
partition, chosen with :func:`~meterops.bus.base.split_by_partition` (the same
CRC-32 of the meter id as the embedded bus, so a meter always lands in one
partition), as an Arrow IPC stream of at most ``max_message_rows`` rows and
about ``max_message_bytes`` bytes, so a cluster with the default 1 MB message
limit takes them; librdkafka compresses batches with lz4.

Differences from the embedded log a caller can see:

* Offsets number messages, not rows: messages come as
  ``Message(..., rows_numbered=False)`` and :meth:`Bus.lag` counts messages.
* ``send`` returns once the rows are queued in the client; they are durable
  (acknowledged by all in-sync replicas) when :meth:`KafkaProducer.flush` or
  ``close`` returns, and those raise if any message failed. While a broker is
  down the client keeps retrying for ``message.timeout.ms`` (5 minutes here)
  before a message fails; such a failure surfaces as
  :class:`~meterops.errors.Unavailable`. The producer is idempotent, so
  retries never duplicate a message.
* Group membership is Kafka's classic protocol with cooperative-sticky
  assignment: a member that leaves with ``close`` hands its partitions over
  at once (its revocation and a LeaveGroup request), one that dies (``kill
  -9``, a lost host) does so after ``session.timeout.ms``: 10 s here, with a
  heartbeat every second, instead of librdkafka's 45 s / 3 s. Both can be
  changed in ``[bus.kafka]``; the broker bounds the session timeout by
  ``group.min.session.timeout.ms`` (6 s by default).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa

from meterops.bus.base import (
    Bus,
    Consumer,
    Producer,
    TopicPartition,
    log_assignment_change,
    split_by_partition,
)
from meterops.errors import BackendError, ConfigError, MissingDependency, Unavailable
from meterops.settings import Settings, parse_duration
from meterops.types import ROWS_PER_MESSAGE_BITS, Message

if TYPE_CHECKING:
    import confluent_kafka
    import confluent_kafka.admin

__all__ = ["KafkaBus", "KafkaConsumer", "KafkaProducer", "build"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_MESSAGE_ROWS = 100_000
# Payload budget under the 1 MB default of ``message.max.bytes`` (broker) and
# of ``max.message.bytes`` (topic), leaving room for record-batch framing.
DEFAULT_MAX_MESSAGE_BYTES = 900_000
_MAX_ROWS = (1 << ROWS_PER_MESSAGE_BITS) - 1  # Message.row_offsets needs rows < 2**24
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_ADMIN_TIMEOUT = 15.0
JOIN_TIMEOUT = 30.0  # longest a new member's first poll waits to join its group
CATCH_UP_GRACE = 5.0  # longest poll waits past its timeout for data known to be there

# Set by the bus because its promises depend on them; a user value is an error.
PROTECTED = frozenset(
    {
        "bootstrap.servers",
        "acks",
        "enable.idempotence",
        "group.id",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "logger",
        "error_cb",
    }
)
# Defaults a user may override through settings.bus.kafka.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "compression.type": "lz4",
    "linger.ms": 5,
    "message.timeout.ms": 300_000,  # a broker may be down this long without losing a row
    "reconnect.backoff.max.ms": 1000,
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1000,
    "enable.partition.eof": False,
    # A fetch waiting for new data blocks the other partitions' fetches on
    # that broker: keep it short for stream latency (the default is 500 ms).
    "fetch.wait.max.ms": 100,
    "reconnect.backoff.max.ms": 1000,
}
COMMON_DEFAULTS: dict[str, Any] = {"reconnect.backoff.max.ms": 1000}


def _kafka() -> Any:
    """The confluent_kafka module, or MissingDependency naming the extra."""
    try:
        import confluent_kafka
        import confluent_kafka.admin
    except ImportError as exc:
        raise MissingDependency("confluent-kafka", "kafka") from exc
    return confluent_kafka


def build(url: str, settings: Settings) -> KafkaBus:
    """Builder for ``kafka://host:port[,host:port...]?prefix=...`` (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme != "kafka" or not parts.netloc:
        raise ConfigError(f"a Kafka bus URL looks like kafka://host:9092, got {url!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    known = {"prefix", "max_message_rows", "max_message_bytes"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} in the Kafka bus URL; "
            f"valid ones are: {', '.join(sorted(known))}"
        )

    def one(key: str, default: str) -> str:
        return query.get(key, [default])[-1]

    try:
        max_rows = int(one("max_message_rows", str(DEFAULT_MAX_MESSAGE_ROWS)))
        max_bytes = int(one("max_message_bytes", str(DEFAULT_MAX_MESSAGE_BYTES)))
    except ValueError as exc:
        raise ConfigError(f"max_message_rows / max_message_bytes must be integers: {exc}") from exc
    return KafkaBus(
        parts.netloc,
        prefix=one("prefix", ""),
        partitions=settings.bus.partitions,
        replication_factor=settings.bus.replication_factor,
        retention_ms=int(parse_duration(settings.bus.retention).total_seconds() * 1000),
        client_config=settings.bus.kafka,
        max_message_rows=max_rows,
        max_message_bytes=max_bytes,
    )


def _encode(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def _transient(code: int) -> bool:
    """Errors that mean "cannot reach the cluster right now"."""
    ke = _kafka().KafkaError
    return code in {
        ke._TRANSPORT,
        ke._ALL_BROKERS_DOWN,
        ke._TIMED_OUT,
        ke._MSG_TIMED_OUT,
        ke._WAIT_COORD,
        ke._RESOLVE,
        ke.REQUEST_TIMED_OUT,
        ke.COORDINATOR_NOT_AVAILABLE,
        ke.NOT_COORDINATOR,
        ke.COORDINATOR_LOAD_IN_PROGRESS,
        ke.LEADER_NOT_AVAILABLE,
        ke.NOT_LEADER_FOR_PARTITION,
        ke.NETWORK_EXCEPTION,
        ke.BROKER_NOT_AVAILABLE,
        ke.NOT_ENOUGH_REPLICAS,
        # right after a topic is created its partition leaders are still being
        # elected: an offset lookup can meet an epoch the broker has not caught up with
        ke.UNKNOWN_LEADER_EPOCH,
        ke.FENCED_LEADER_EPOCH,
        # A broker that just restarted is "fenced" for a moment and topic
        # creation fails with this; a truly too-high replication factor then
        # fails once the worker's retry_for runs out.
        ke.INVALID_REPLICATION_FACTOR,
    }


def _translate(exc: Exception, what: str) -> BackendError:
    """A meterops error for a confluent-kafka exception (chain it with ``from``)."""
    err: Any = exc.args[0] if exc.args else None
    code = err.code() if hasattr(err, "code") else None
    if code is not None and _transient(code):
        return Unavailable(f"Kafka unavailable while {what}: {err}", retry_after=1.0)
    return BackendError(f"Kafka error while {what}: {err or exc}")


class KafkaProducer(Producer):
    """Sends Arrow tables as per-partition messages (see the module docstring)."""

    def __init__(self, bus: KafkaBus) -> None:
        self._bus = bus
        self._failures: list[tuple[str, int, str, bool]] = []  # topic, partition, error, transient
        self._producer: confluent_kafka.Producer | None = _kafka().Producer(bus.producer_config())

    def _delivered(self, err: Any, msg: Any) -> None:
        # Called from poll/flush on this thread; one callback per message.
        if err is not None:
            self._failures.append(
                (str(msg.topic()), int(msg.partition()), str(err), _transient(err.code()))
            )

    def _chunks(self, table: pa.Table) -> Iterable[bytes]:
        """IPC payloads of at most max_message_rows rows and about max_message_bytes each."""
        n = table.num_rows
        limit_rows = min(self._bus.max_message_rows, _MAX_ROWS)
        per_row = max(1.0, table.nbytes / n)
        step = max(1, min(limit_rows, int(self._bus.max_message_bytes * 0.9 / per_row)))
        start = 0
        while start < n:
            size = min(step, n - start)
            payload = _encode(table.slice(start, size))
            if len(payload) > self._bus.max_message_bytes and size > 1:
                step = max(1, size // 2)  # the estimate was off (e.g. long strings): halve
                continue
            yield payload
            start += size

    def send(self, topic: str, table: pa.Table) -> int:
        """Queue ``table``'s rows; they are durable once ``flush`` returns without error."""
        if self._producer is None:
            raise BackendError("send on a closed Kafka producer")
        partitions = self._bus.partition_count(topic)
        name = self._bus.topic_name(topic)
        producer = self._producer
        for partition, part in split_by_partition(table, partitions):
            for payload in self._chunks(part):
                while True:
                    try:
                        producer.produce(
                            name, payload, partition=partition, on_delivery=self._delivered
                        )
                        break
                    except BufferError:  # local queue full (e.g. broker down): wait for room
                        producer.poll(0.1)
                    except _kafka().KafkaException as exc:
                        raise _translate(exc, f"sending to {name}") from exc
                producer.poll(0)
        return int(table.num_rows)

    def flush(self) -> None:
        """Block until every queued message is acknowledged; raise if any failed.

        Waits at most ``message.timeout.ms`` (after which librdkafka fails the
        messages it could not deliver). Failures raise :class:`Unavailable`
        when the cluster was unreachable, :class:`BackendError` otherwise.
        """
        if self._producer is None:
            return
        timeout_s = float(self._bus.producer_config()["message.timeout.ms"]) / 1000 + 30
        left = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if failures:
            topic, partition, error, _ = failures[0]
            text = (
                f"{len(failures)} Kafka message(s) not delivered "
                f"(first: {topic}[{partition}]: {error})"
            )
            if all(f[3] for f in failures):
                raise Unavailable(text, retry_after=5.0)
            raise BackendError(text)
        if left:
            raise Unavailable(f"{left} Kafka message(s) still undelivered after {timeout_s:.0f} s")

    def close(self) -> None:
        """Flush (raising like :meth:`flush`), then release the client; safe twice."""
        if self._producer is None:
            return
        try:
            self.flush()
        finally:
            producer, self._producer = self._producer, None
            close = getattr(producer, "close", None)  # confluent-kafka >= 2.6 only
            if close is not None:
                close()


class KafkaConsumer(Consumer):
    """A member of a Kafka consumer group over the prefixed topics.

    Only the thread that polls a consumer should call into its client:
    confluent-kafka 2.16 serializes the calls on one client handle (its
    "reentrancy gate", confluent-kafka-python PR #2322), so a call from a
    second thread waits, retrying every millisecond, until the poller leaves
    ``consume()``, and a busy poll loop re-enters it at once: the caller
    starves for minutes. :meth:`assignment` therefore answers from the
    rebalance callbacks' bookkeeping, never from the client.
    """

    def __init__(self, bus: KafkaBus, group: str, topics: Iterable[str]) -> None:
        self._bus = bus
        self._group = group
        self._topics = list(topics)
        self._rows_per_message = 0.0  # running estimate, to size consume() calls
        # The messages of the poll in progress: a revocation inside it drops
        # those of the partitions taken away (fetched before; the next owner,
        # maybe this member again, reads them from the committed offset).
        self._pending: list[Message] = []
        self._joined_at: float | None = None  # first assignment (even an empty one)
        # Replaced (never mutated) by the callbacks, so other threads read a snapshot.
        self._assigned: frozenset[TopicPartition] = frozenset()
        config = bus.consumer_config(group)
        self.member = str(config["client.id"])  # the broker's member id once joined
        self._consumer: confluent_kafka.Consumer | None = _kafka().Consumer(config)
        self._consumer.subscribe(
            [bus.topic_name(t) for t in self._topics],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    # Rebalance callbacks run inside consume() (or close()) on the polling
    # thread; confluent-kafka then applies the assignment change itself. With
    # the cooperative protocol they carry the partitions added or taken away,
    # with an eager one (range, roundrobin) the whole new assignment and the
    # whole old one: adding and removing fits both.
    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        if self._joined_at is None:
            self._joined_at = time.monotonic()
        with contextlib.suppress(Exception):  # cosmetic: the name in the log lines
            self.member = consumer.memberid() or self.member
        self._set_assigned(self._assigned | {self._tp(p) for p in partitions}, "")

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        self._release({self._tp(p) for p in partitions}, "revoked")

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        """The group went on without us (e.g. missed heartbeats): others own these now."""
        self._release({self._tp(p) for p in partitions}, "lost")

    def _release(self, gone: set[TopicPartition], why: str) -> None:
        """Forget the partitions and the messages of them fetched so far in this poll.

        Only those fetched so far: when the group hands a partition back
        within the same poll, what it fetches afterwards (from the committed
        offset) is this member's to return, and dropping it would lose it,
        since the client's position is already past it.
        """
        self._pending[:] = [m for m in self._pending if (m.topic, m.partition) not in gone]
        self._set_assigned(self._assigned - gone, why)

    def _set_assigned(self, assigned: Iterable[TopicPartition], why: str) -> None:
        before, self._assigned = self._assigned, frozenset(assigned)
        log_assignment_change(self._group, self.member, before, self._assigned, why)

    def _tp(self, p: Any) -> TopicPartition:
        return (self._bus.unprefixed(str(p.topic)), int(p.partition))

    def _live(self) -> confluent_kafka.Consumer:
        if self._consumer is None:
            raise BackendError("the Kafka consumer is closed")
        return self._consumer

    def assignment(self) -> set[TopicPartition]:
        """The partitions of the last rebalance callbacks: safe from any thread, no round trip."""
        return set(self._assigned)

    def poll(self, max_rows: int, timeout: float) -> list[Message]:
        """Wait up to ``timeout`` s for a first message, then take what is ready, ~max_rows rows.

        "Nothing within the timeout" means nothing is waiting for this member,
        as on the embedded bus: a new member first waits (up to
        ``JOIN_TIMEOUT`` s) until it has joined its group, the timeout counts
        from then, and while an owned partition has not yet reported its end
        offset or is known to hold unread messages the wait is extended by up
        to ``CATCH_UP_GRACE`` s. Messages of a partition revoked during this
        call, fetched before the revocation, are dropped: their new owner
        reads them from the committed offset (see :meth:`_release`).
        """
        consumer = self._live()
        kafka = _kafka()
        start = time.monotonic()
        out = self._pending = []
        rows = 0
        while rows < max_rows:
            now = time.monotonic()
            if out:
                wait = 0.0
            elif self._joined_at is None:
                if now >= start + JOIN_TIMEOUT:
                    break
                wait = min(0.05, start + JOIN_TIMEOUT - now)
            else:
                deadline = max(start, self._joined_at) + timeout
                if now < deadline:
                    wait = deadline - now
                elif now < deadline + CATCH_UP_GRACE and self._catching_up():
                    wait = 0.05
                else:
                    break
            # consume(n, wait) blocks until n messages or the wait is over, so
            # wait for one message, then take up to n that are ready at once.
            want = max_rows - rows
            count = 1 if self._rows_per_message <= 0 else math.ceil(want / self._rows_per_message)
            try:
                batch = consumer.consume(1, wait) if wait > 0 else []
                if batch or wait == 0:
                    batch += consumer.consume(max(1, min(count, 10_000) - len(batch)), 0)
            except kafka.KafkaException as exc:
                raise _translate(exc, "polling") from exc
            if not batch:
                if out:
                    break
                continue
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise BackendError(f"fatal Kafka consumer error: {err}")
                    log.debug("Kafka consumer: %s", err)
                    continue
                out.append(self._message(msg))
            rows = sum(m.table.num_rows for m in out)  # a revocation may have dropped some
        self._pending = []
        if out:
            seen = sum(len(m) for m in out) / len(out)
            self._rows_per_message = (
                seen if self._rows_per_message <= 0 else (0.8 * self._rows_per_message + 0.2 * seen)
            )
        return out

    def _catching_up(self) -> bool:
        """Whether an owned partition may still deliver messages that are already written.

        True until a fetch has reported a partition's end offset (the messages
        of that fetch are queued along with it), or while the position is
        known to be behind it.
        """
        consumer = self._live()
        owned = consumer.assignment()
        if not owned:
            return False
        positions = {(p.topic, p.partition): p.offset for p in consumer.position(owned)}
        for tp in owned:
            marks = consumer.get_watermark_offsets(tp, cached=True)
            high = marks[1] if marks else -1
            pos = positions.get((tp.topic, tp.partition), -1)
            if high < 0 or 0 <= pos < high:
                return True
        return False

    def _message(self, msg: Any) -> Message:
        topic = self._bus.unprefixed(str(msg.topic()))
        partition, offset = int(msg.partition()), int(msg.offset())
        try:
            table = pa.ipc.open_stream(msg.value()).read_all()
        except (pa.ArrowInvalid, TypeError) as exc:
            raise BackendError(
                f"message {topic}[{partition}]@{offset} is not an Arrow IPC stream: {exc}"
            ) from exc
        return Message(topic, partition, offset, table, rows_numbered=False)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit synchronously; partitions no longer owned are skipped (the new owner redoes them).

        Raises :class:`Unavailable` when the group coordinator cannot be reached.
        """
        consumer = self._live()
        kafka = _kafka()
        owned = self.assignment()
        todo = [
            kafka.TopicPartition(self._bus.topic_name(t), p, int(o))
            for (t, p), o in offsets.items()
            if (t, p) in owned
        ]
        if not todo:
            return
        try:
            result = consumer.commit(offsets=todo, asynchronous=False)
        except kafka.KafkaException as exc:
            code = exc.args[0].code() if exc.args else None
            if code in (
                kafka.KafkaError.REBALANCE_IN_PROGRESS,
                kafka.KafkaError.ILLEGAL_GENERATION,
                kafka.KafkaError.UNKNOWN_MEMBER_ID,
                kafka.KafkaError._NO_OFFSET,
            ):
                log.info("commit skipped, partitions moved to another member: %s", exc)
                return
            raise _translate(exc, f"committing offsets of group {self._group!r}") from exc
        for tp in result or []:
            if tp.error is not None:
                raise _translate(
                    kafka.KafkaException(tp.error), f"committing {tp.topic}[{tp.partition}]"
                )

    def close(self) -> None:
        """Leave the group (handing partitions over at once) without committing; safe twice.

        Call it from the polling thread (or once that thread stopped polling).
        """
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                consumer.close()  # runs on_revoke, then sends LeaveGroup
            self._set_assigned((), "left the group, released")


class KafkaBus(Bus):
    """See the module docstring."""

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str = "",
        partitions: int = 4,
        replication_factor: int = 1,
        retention_ms: int = 7 * 86_400_000,
        client_config: Mapping[str, Any] | None = None,
        max_message_rows: int = DEFAULT_MAX_MESSAGE_ROWS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        user = dict(client_config or {})
        clash = sorted(PROTECTED & set(user))
        if clash:
            raise ConfigError(
                f"bus.kafka may not set {', '.join(clash)}: meterops sets it "
                "(the bootstrap servers come from the bus URL)"
            )
        if max_message_rows < 1 or max_message_bytes < 1024:
            raise ConfigError("max_message_rows must be >= 1 and max_message_bytes >= 1024")
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.retention_ms = retention_ms
        self.max_message_rows = max_message_rows
        self.max_message_bytes = max_message_bytes
        self._user = user
        self._partition_counts: dict[str, int] = {}
        self._admin: confluent_kafka.admin.AdminClient | None = None

    def __repr__(self) -> str:  # never shows client settings: they may hold secrets
        return f"KafkaBus({self.bootstrap!r}, prefix={self.prefix!r})"

    # -- client configuration ------------------------------------------------
    def _config(self, defaults: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **COMMON_DEFAULTS,
            **defaults,
            **self._user,
            **fixed,
            "bootstrap.servers": self.bootstrap,
            "logger": logging.getLogger(f"{__name__}.rdkafka"),
            "error_cb": _log_error,
        }

    def _message_limit(self) -> int:
        """Client-side message / batch size: our payloads plus framing, at least the default."""
        return max(1_000_000, self.max_message_bytes + 65_536)

    def producer_config(self) -> dict[str, Any]:
        limit = self._message_limit()
        return self._config(
            {**PRODUCER_DEFAULTS, "message.max.bytes": limit, "batch.size": limit},
            {"enable.idempotence": True, "acks": "all"},
        )

    def consumer_config(self, group: str) -> dict[str, Any]:
        """Settings of one group member; its ``client.id`` names it: ``meterops-<pid>-<random>``."""
        member = f"meterops-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return self._config(
            {**CONSUMER_DEFAULTS, "client.id": member},
            {
                "group.id": self.group_name(group),
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
            },
        )

    def admin_config(self) -> dict[str, Any]:
        return self._config({}, {})

    # -- names -----------------------------------------------------------------
    def group_name(self, group: str) -> str:
        """Consumer groups live in the same namespace as the topics (``prefix + group``)."""
        return self.prefix + group

    def topic_name(self, topic: str) -> str:
        name = self.prefix + topic
        if not _TOPIC_NAME.match(name):
            raise ConfigError(
                f"{name!r} is not a valid Kafka topic name (letters, digits, '.', '_', '-')"
            )
        return name

    def unprefixed(self, name: str) -> str:
        return name.removeprefix(self.prefix)

    # -- lifecycle ---------------------------------------------------------------
    def open(self) -> KafkaBus:
        """Connect the admin client and check that the cluster answers."""
        if self._admin is not None:
            return self
        admin = _kafka().admin.AdminClient(self.admin_config())
        try:
            admin.list_topics(timeout=_ADMIN_TIMEOUT)
        except _kafka().KafkaException as exc:
            raise Unavailable(f"cannot reach Kafka at {self.bootstrap}: {exc}", 5.0) from exc
        self._admin = admin
        return self

    def close(self) -> None:
        self._admin = None  # the admin client has no close(); dropping it stops its threads

    def _admin_client(self) -> confluent_kafka.admin.AdminClient:
        if self._admin is None:
            raise BackendError("KafkaBus used before open()")
        return self._admin

    # -- admin -------------------------------------------------------------------
    def create_topics(self, topics: Iterable[str]) -> None:
        """Create missing topics with partitions, replication, retention and message size."""
        kafka = _kafka()
        admin = self._admin_client()
        wanted = {self.topic_name(t): t for t in topics}
        try:
            existing = admin.list_topics(timeout=_ADMIN_TIMEOUT).topics
        except kafka.KafkaException as exc:
            raise _translate(exc, "listing topics") from exc
        missing = [name for name in wanted if name not in existing]
        if missing:
            config = {
                "retention.ms": str(self.retention_ms),
                # Room for a full producer batch of our messages.
                "max.message.bytes": str(2 * self._message_limit()),
            }
            new = [
                kafka.admin.NewTopic(n, self.partitions, self.replication_factor, config=config)
                for n in missing
            ]
            futures = admin.create_topics(new, request_timeout=_ADMIN_TIMEOUT)
            for name, future in futures.items():
                try:
                    future.result()
                except kafka.KafkaException as exc:
                    if exc.args and exc.args[0].code() == kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                        continue  # created meanwhile by another process
                    raise _translate(exc, f"creating topic {name}") from exc
        for name, topic in wanted.items():
            self._partition_counts[topic] = self._wait_partitions(name)

    def _wait_partitions(self, name: str) -> int:
        """Partition count of an existing topic, once its partitions have leaders."""
        kafka = _kafka()
        deadline = time.monotonic() + _ADMIN_TIMEOUT
        while True:
            try:
                meta = self._admin_client().list_topics(name, timeout=_ADMIN_TIMEOUT)
            except kafka.KafkaException as exc:
                raise _translate(exc, f"describing topic {name}") from exc
            topic = meta.topics.get(name)
            if (
                topic is not None
                and topic.error is None
                and topic.partitions
                and all(p.leader >= 0 for p in topic.partitions.values())
            ):
                return len(topic.partitions)
            if time.monotonic() > deadline:
                raise Unavailable(f"Kafka topic {name} has no leaders after {_ADMIN_TIMEOUT} s")
            time.sleep(0.05)

    def partition_count(self, topic: str) -> int:
        """Partitions of ``topic`` (cached), creating the topic on first use."""
        if topic not in self._partition_counts:
            self.create_topics([topic])
        return self._partition_counts[topic]

    def producer(self) -> KafkaProducer:
        return KafkaProducer(self)

    def consumer(self, group: str, topics: Iterable[str]) -> KafkaConsumer:
        topics = list(topics)
        for topic in topics:
            self.partition_count(topic)  # subscribe to topics that exist
        return KafkaConsumer(self, group, topics)

    def _admin_call(self, call: Callable[[], T], what: str) -> T:
        """Run an admin request, retrying transient errors for up to ``_ADMIN_TIMEOUT`` s.

        Right after a topic is created or a broker restarts, leaders and group
        coordinators take a moment to load; only a lasting failure raises.
        """
        kafka = _kafka()
        deadline = time.monotonic() + _ADMIN_TIMEOUT
        while True:
            try:
                return call()
            except kafka.KafkaException as exc:
                error = _translate(exc, what)
                if not isinstance(error, Unavailable) or time.monotonic() > deadline:
                    raise error from exc
            time.sleep(0.1)

    def _list_offsets(self, topic: str, spec: Any) -> dict[int, int]:
        kafka = _kafka()
        name = self.topic_name(topic)
        request = {kafka.TopicPartition(name, p): spec for p in range(self.partition_count(topic))}

        def call() -> dict[int, int]:
            futures = self._admin_client().list_offsets(request, request_timeout=_ADMIN_TIMEOUT)
            return {tp.partition: int(f.result().offset) for tp, f in futures.items()}

        return self._admin_call(call, f"listing offsets of {name}")

    def end_offsets(self, topic: str) -> dict[int, int]:
        """High watermarks (next message offset) per partition."""
        return self._list_offsets(topic, _kafka().admin.OffsetSpec.latest())

    def start_offsets(self, topic: str) -> dict[int, int]:
        """Low watermarks (first message still kept) per partition."""
        return self._list_offsets(topic, _kafka().admin.OffsetSpec.earliest())

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed next offsets; the low watermark where it has none."""
        kafka = _kafka()
        name = self.topic_name(topic)
        n = self.partition_count(topic)
        request = kafka.ConsumerGroupTopicPartitions(
            self.group_name(group), [kafka.TopicPartition(name, p) for p in range(n)]
        )

        def call() -> Any:
            futures = self._admin_client().list_consumer_group_offsets(
                [request], request_timeout=_ADMIN_TIMEOUT
            )
            return futures[self.group_name(group)].result()

        result = self._admin_call(call, f"reading offsets of group {group!r}")
        done = {
            int(tp.partition): int(tp.offset)
            for tp in result.topic_partitions
            if tp.error is None and tp.offset >= 0
        }
        if len(done) < n:
            low = self.start_offsets(topic)
            done = {p: done.get(p, low.get(p, 0)) for p in range(n)}
        return done

    def lag(self, group: str, topic: str) -> int:
        """Messages (not rows: Kafka numbers messages) written but not committed by ``group``."""
        return super().lag(group, topic)

    def group_members(self, group: str) -> dict[str, set[TopicPartition]]:
        """The group coordinator's view: member id -> partitions (of this bus's topics).

        Member ids start with the member's ``client.id``; a member that died
        stays listed until its session times out.
        """
        kafka = _kafka()
        name = self.group_name(group)

        def call() -> Any:
            futures = self._admin_client().describe_consumer_groups(
                [name], request_timeout=_ADMIN_TIMEOUT
            )
            return futures[name].result()

        try:
            described = self._admin_call(call, f"describing group {group!r}")
        except BackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, kafka.KafkaException) and cause.args[0].code() in (
                kafka.KafkaError.GROUP_ID_NOT_FOUND,
            ):
                return {}
            raise
        members: dict[str, set[TopicPartition]] = {}
        for member in described.members:
            assignment = member.assignment.topic_partitions if member.assignment else []
            members[str(member.member_id)] = {
                self._tp_of(tp) for tp in assignment if str(tp.topic).startswith(self.prefix)
            }
        return members

    def _tp_of(self, tp: Any) -> TopicPartition:
        return (self.unprefixed(str(tp.topic)), int(tp.partition))


def _log_error(err: Any) -> None:
    """librdkafka's global errors (e.g. all brokers down): logged, retried by the client."""
    log.warning("Kafka client: %s", err)
