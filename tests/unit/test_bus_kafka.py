"""The Kafka bus beyond the contract: broker outages, dead members, message splitting, config.

Tests marked ``kafka`` use the session's real broker (``tests/service_fixtures.py``);
the others need no broker.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from meterops.backends import make_bus
from meterops.bus.base import Consumer
from meterops.bus.kafka import KafkaBus, KafkaConsumer, build
from meterops.errors import ConfigError, MissingDependency, Unavailable
from meterops.services.base import Service, free_port
from meterops.settings import Settings, load_settings
from meterops.types import Message
from tests.helpers import readings


def settings_for(url: str, tmp_path: Path, **kafka: str) -> Settings:
    return load_settings(None, project_dir=tmp_path, backends={"bus": url}, bus={"kafka": kafka})


def open_bus(url: str, tmp_path: Path, **kafka: str) -> KafkaBus:
    bus = make_bus(settings_for(url, tmp_path, **kafka))
    assert isinstance(bus, KafkaBus)
    return bus.open()


def drain(consumer: Consumer, commit: bool) -> list[Message]:
    got: list[Message] = []
    while batch := consumer.poll(10_000, 0.5):
        got.extend(batch)
        if commit:
            consumer.commit({(m.topic, m.partition): m.next_offset for m in batch})
    return got


def drain_at_least(consumer: Consumer, rows: int, deadline: float = 180) -> list[Message]:
    """Poll and commit until ``rows`` rows came (or ``deadline`` s), then once more for extras.

    After a broker restart the group coordinator reloads its offsets first,
    which can take longer than a drain's idle window (and, on a loaded
    2-core machine, longer than a minute: one full-suite run lost the race).
    """
    got: list[Message] = []
    end = time.monotonic() + deadline
    while sum(len(m) for m in got) < rows and time.monotonic() < end:
        batch = consumer.poll(10_000, 0.5)
        got.extend(batch)
        consumer.commit({(m.topic, m.partition): m.next_offset for m in batch})
    return got + drain(consumer, commit=True)


def keys(messages: list[Message]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for m in messages:
        ts = m.table.column("ts").cast(pa.int64()).to_pylist()
        out.extend(zip(m.table.column("meter_id").to_pylist(), ts, strict=True))
    return out


def day_batch(day: int) -> pa.Table:
    """20 meters x 24 hourly readings on day ``day`` of 2024: keys unique across days."""
    start = (date(2024, 1, 1) + timedelta(days=day)).isoformat()
    return readings(meters=20, steps=24, start=start, seed=day).table


@pytest.mark.kafka
@pytest.mark.slow
def test_a_broker_outage_mid_stream_loses_and_duplicates_nothing(
    kafka_service: Service, kafka_url: str, tmp_path: Path
) -> None:
    bus = open_bus(kafka_url, tmp_path)
    sent = 0
    with bus:
        with bus.producer() as producer:
            for day in range(10):
                sent += producer.send("readings", day_batch(day))
            producer.flush()
            with bus.consumer("g", ["readings"]) as consumer:  # reads and commits part one
                first = drain(consumer, commit=True)
            kafka_service.stop()
            for day in range(10, 20):  # queued in the client while the broker is down
                sent += producer.send("readings", day_batch(day))
            kafka_service.start()
            for day in range(20, 30):
                sent += producer.send("readings", day_batch(day))
            producer.flush()
        with bus.consumer("g", ["readings"]) as consumer:
            rest = drain_at_least(consumer, sent - sum(len(m) for m in first))
        got = keys(first) + keys(rest)
        assert len(first) > 0
        assert len(got) == sent == 30 * 480
        assert len(set(got)) == len(got)  # every row exactly once
        assert bus.lag("g", "readings") == 0


@pytest.mark.kafka
def test_a_member_that_dies_without_commit_hands_its_messages_to_the_next(
    kafka_url: str, tmp_path: Path
) -> None:
    with open_bus(kafka_url, tmp_path) as bus:
        with bus.producer() as producer:
            for day in range(3):
                producer.send("readings", day_batch(day))
        doomed = bus.consumer("g", ["readings"])
        committed = doomed.poll(1, 5.0)  # one message or so: committed
        assert committed
        doomed.commit({(m.topic, m.partition): m.next_offset for m in committed})
        uncommitted = drain(doomed, commit=False)
        assert uncommitted
        doomed.close()  # gone without committing the rest
        with bus.consumer("g", ["readings"]) as heir:
            again = drain(heir, commit=True)
        assert sorted((m.partition, m.offset) for m in again) == sorted(
            (m.partition, m.offset) for m in uncommitted
        )
        assert sorted(keys(again)) == sorted(keys(uncommitted))
        assert not set(keys(again)) & set(keys(committed))


@pytest.mark.kafka
def test_big_sends_are_split_into_messages_and_come_back_in_order(
    kafka_url: str, tmp_path: Path
) -> None:
    batch = readings(meters=1, steps=1050).table  # one meter: one partition
    with open_bus(f"{kafka_url}&max_message_rows=100", tmp_path) as bus:
        with bus.producer() as producer:
            assert producer.send("readings", batch) == 1050
        with bus.consumer("g", ["readings"]) as consumer:
            got = drain(consumer, commit=True)
    assert [len(m) for m in got] == [100] * 10 + [50]
    assert [m.offset for m in got] == list(range(got[0].offset, got[0].offset + 11))
    assert pa.concat_tables([m.table for m in got]).equals(batch)
    assert all(not m.rows_numbered for m in got)


@pytest.mark.kafka
def test_a_topic_with_the_default_1mb_limit_takes_large_sends(
    kafka_url: str, tmp_path: Path
) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    with open_bus(kafka_url, tmp_path) as bus:
        name = bus.topic_name("readings")
        admin = AdminClient({"bootstrap.servers": bus.bootstrap})  # no max.message.bytes override
        admin.create_topics([NewTopic(name, 2, 1)])[name].result()
        batch = readings(meters=10, steps=30_000).table  # ~9 MB of Arrow
        with bus.producer() as producer:
            producer.send("readings", batch)
        with bus.consumer("g", ["readings"]) as consumer:
            got = drain(consumer, commit=True)
        assert len(got) > 2
        table = pa.concat_tables([m.table for m in got])
        assert table.num_rows == batch.num_rows
        assert sorted(keys(got)) == sorted(
            zip(
                batch.column("meter_id").to_pylist(),
                batch.column("ts").cast(pa.int64()).to_pylist(),
                strict=True,
            )
        )


@pytest.mark.kafka
def test_assignment_answers_at_once_while_another_thread_polls(
    kafka_url: str, tmp_path: Path
) -> None:
    """confluent-kafka serializes calls on one client: asking it from a second thread would
    wait until the poller leaves ``consume()``, which a busy poll loop barely ever does."""
    with open_bus(kafka_url, tmp_path) as bus:
        consumer = bus.consumer("g", ["readings"])
        stop = threading.Event()

        def poll_forever() -> None:
            while not stop.is_set():
                consumer.poll(1000, 1.0)

        poller = threading.Thread(target=poll_forever, daemon=True)
        poller.start()
        try:
            deadline = time.monotonic() + 30
            while consumer.assignment() != {("readings", p) for p in range(4)}:
                assert time.monotonic() < deadline, consumer.assignment()
                time.sleep(0.05)
            slowest = 0.0
            for _ in range(50):
                started = time.perf_counter()
                assert len(consumer.assignment()) == 4
                slowest = max(slowest, time.perf_counter() - started)
                time.sleep(0.01)
            assert slowest < 0.05
        finally:
            stop.set()
            poller.join(timeout=10)
            consumer.close()
        assert consumer.assignment() == set()


# -- no broker needed ----------------------------------------------------------


def test_consumers_notice_a_dead_member_within_seconds_unless_configured_otherwise(
    tmp_path: Path,
) -> None:
    bus = build("kafka://k:9092", settings_for("kafka://k:9092", tmp_path))
    config = bus.consumer_config("g")
    assert config["session.timeout.ms"] == 10_000  # librdkafka's default is 45 s
    assert config["heartbeat.interval.ms"] == 1000
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert str(config["client.id"]).startswith(f"meterops-{os.getpid()}-")
    assert bus.consumer_config("g")["client.id"] != config["client.id"]  # one per member
    slow = build(
        "kafka://k:9092",
        settings_for("kafka://k:9092", tmp_path, **{"session.timeout.ms": "30000"}),
    )
    assert slow.consumer_config("g")["session.timeout.ms"] == "30000"


def test_settings_bus_kafka_reach_every_client_and_secrets_stay_out_of_repr(
    tmp_path: Path,
) -> None:
    extra = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "meterops",
        "sasl.password": "s3cret-value",
        "session.timeout.ms": "6000",
    }
    bus = build(
        "kafka://k1:9092,k2:9092?prefix=prod.", settings_for("kafka://x:1", tmp_path, **extra)
    )
    for config in (bus.producer_config(), bus.consumer_config("g"), bus.admin_config()):
        assert {k: config[k] for k in extra} == extra
        assert config["bootstrap.servers"] == "k1:9092,k2:9092"
    producer, consumer = bus.producer_config(), bus.consumer_config("workers")
    assert producer["enable.idempotence"] is True and producer["acks"] == "all"
    assert producer["compression.type"] == "lz4"
    assert consumer["group.id"] == "prod.workers" and consumer["enable.auto.commit"] is False
    assert consumer["auto.offset.reset"] == "earliest"
    assert bus.topic_name("readings") == "prod.readings"
    assert "s3cret" not in repr(bus) and "s3cret" not in str(bus)


def test_keys_that_carry_the_bus_promises_cannot_be_overridden(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"enable\.auto\.commit"):
        build(
            "kafka://k:9092",
            settings_for("kafka://k:9092", tmp_path, **{"enable.auto.commit": "true"}),
        )
    with pytest.raises(ConfigError, match="valid ones are"):
        build("kafka://k:9092?partitions=3", settings_for("kafka://k:9092", tmp_path))


def test_flush_raises_unavailable_when_nothing_can_be_delivered(tmp_path: Path) -> None:
    url = f"kafka://127.0.0.1:{free_port()}"  # nobody listens there
    bus = build(url, settings_for(url, tmp_path, **{"message.timeout.ms": "500"}))
    bus._partition_counts["readings"] = 4  # skip the admin round trip: no broker
    producer = bus.producer()
    assert producer.send("readings", readings(meters=3, steps=2).table) == 6  # queued
    with pytest.raises(Unavailable, match="not delivered"):
        producer.flush()
    producer.close()  # nothing left: closes quietly


def test_a_missing_driver_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    bus = build("kafka://k:9092", settings_for("kafka://k:9092", tmp_path))
    with pytest.raises(MissingDependency, match=r"meterops\[kafka\]"):
        bus.open()


class _Client:
    """A confluent-kafka consumer whose consume() calls play a script of group events.

    The rebalances a broker restart can cause are rare and timing-bound on a
    real broker; this plays one exactly, on the client interface the bus uses.
    """

    def __init__(self, _config: dict[str, object]) -> None:
        self.script: list[list[tuple[str, int]] | str] = []

    def subscribe(self, _topics: list[str], **callbacks: Callable[..., None]) -> None:
        self.on_assign, self.on_revoke = callbacks["on_assign"], callbacks["on_revoke"]

    def memberid(self) -> str:
        return "m"

    def consume(self, _n: int, _timeout: float) -> list[object]:
        while self.script:
            step = self.script.pop(0)
            if isinstance(step, str):  # a group event, run by the client inside consume()
                tp = _TP("t.readings", 0)
                (self.on_assign if step == "assign" else self.on_revoke)(self, [tp])
                continue
            return [_Msg(topic, offset) for topic, offset in step]
        return []

    def assignment(self) -> list[_TP]:
        return []  # nothing to catch up on: poll() ends at its timeout

    def close(self) -> None:
        pass


class _TP:
    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


class _Msg:
    def __init__(self, topic: str, offset: int) -> None:
        self._topic, self._offset = topic, offset
        sink = pa.BufferOutputStream()
        table = pa.table({"offset": [offset]})
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        self._value = sink.getvalue().to_pybytes()

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value


def test_a_partition_handed_back_within_one_poll_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Consumer", _Client)
    bus = build("kafka://k:9092?prefix=t.", settings_for("kafka://k:9092", tmp_path))
    consumer = KafkaConsumer(bus, "g", ["readings"])
    client = consumer._consumer
    assert isinstance(client, _Client)
    p = "t.readings"
    # Offsets 0-1 come, the group takes the partition away and hands it back
    # (as after a coordinator restart): the client fetches again from the
    # committed offset (none: 0), then goes on.
    client.script = ["assign", [(p, 0)], [(p, 1)], "revoke", "assign", [(p, 0), (p, 1)], [(p, 2)]]
    got = consumer.poll(100, 1.0)
    assert [m.offset for m in got] == [0, 1, 2]  # each once: none dropped, none doubled
    assert consumer.assignment() == {("readings", 0)}
    client.script = [[(p, 3)], [(p, 4)], "revoke"]  # taken for good: 3-4 are the next owner's
    assert consumer.poll(100, 1.0) == []
    assert consumer.assignment() == set()
