"""The bus contract: every backend passes these unchanged.

Offsets are counted in the bus's own unit: the embedded log numbers rows,
Kafka numbers messages (``Message.next_offset - Message.offset`` is one
message's span either way), so offset arithmetic and ``lag`` are checked
against the spans of the delivered messages, and row counts separately.
Group membership takes a moment on Kafka, so tests that wait for a
rebalance check until the condition holds or a deadline passes.

Group members run as they do in a worker: each polls on a thread of its own
(:class:`Member`), while the test thread watches them through
``Consumer.assignment()`` and ``Bus.group_members()``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from meterops.bus.base import Bus, Consumer, TopicPartition, partition_for
from meterops.types import Message
from tests.helpers import readings


def drain(consumer: Consumer, timeout: float = 0.3, commit: bool = True) -> list[Message]:
    """Poll until nothing new arrives within ``timeout``."""
    got: list[Message] = []
    while True:
        batch = consumer.poll(1000, timeout)
        if not batch:
            return got
        got.extend(batch)
        if commit:
            consumer.commit({(m.topic, m.partition): m.next_offset for m in batch})


def rows(messages: list[Message]) -> pa.Table:
    return pa.concat_tables([m.table for m in messages])


def span(messages: list[Message]) -> int:
    """Offsets the messages cover (rows on the embedded log, messages on Kafka)."""
    return sum(m.next_offset - m.offset for m in messages)


def wait_until(done: Callable[[], bool], deadline: float = 30) -> bool:
    """Check ``done()`` every 50 ms until it holds or ``deadline`` seconds passed."""
    end = time.monotonic() + deadline
    while not done():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def keys(messages: list[Message]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for m in messages:
        ts = m.table.column("ts").cast(pa.int64()).to_pylist()
        out.extend(zip(m.table.column("meter_id").to_pylist(), ts, strict=True))
    return out


class Member(threading.Thread):
    """A group member polling and committing on its own thread until ``leave()``.

    The consumer is created by the caller and, once the thread runs, used
    only by it (polls, commits and finally ``close``); other threads only
    read ``assignment()`` and the messages received so far.
    """

    def __init__(self, bus: Bus, group: str = "g") -> None:
        super().__init__(daemon=True)
        self.consumer = bus.consumer(group, ["readings"])
        self.messages: list[Message] = []
        self.error: BaseException | None = None
        self._leaving = threading.Event()

    def run(self) -> None:
        try:
            while not self._leaving.is_set():
                batch = self.consumer.poll(1000, 0.1)
                if batch:
                    self.consumer.commit({(m.topic, m.partition): m.next_offset for m in batch})
                    self.messages = self.messages + batch
        except BaseException as exc:  # reported by leave()
            self.error = exc
        finally:
            self.consumer.close()

    @property
    def rows(self) -> int:
        return sum(len(m) for m in self.messages)

    def leave(self) -> None:
        """Stop polling, close (on the member's thread) and re-raise what the thread raised."""
        self._leaving.set()
        self.join(timeout=60)
        assert not self.is_alive(), "member thread did not stop"
        if self.error is not None:
            raise self.error


class TestBusContract:
    def test_everything_sent_is_delivered_once_in_order_per_meter(self, bus: Bus) -> None:
        batch = readings(meters=7, steps=20)
        with bus.producer() as producer:
            assert producer.send("readings", batch.table.slice(0, 70)) == 70
            producer.send("readings", batch.table.slice(70))
            producer.flush()
        with bus.consumer("g", ["readings"]) as consumer:
            got = drain(consumer)
        table = rows(got)
        assert table.num_rows == len(batch)
        assert sorted(table.column("value").to_pylist()) == sorted(
            batch.table.column("value").to_pylist()
        )
        for meter in {f"m-{i}" for i in range(7)}:
            ts = table.filter(pc.equal(table.column("meter_id"), meter)).column("ts")
            assert ts.to_pylist() == sorted(ts.to_pylist())

    def test_a_meter_stays_in_one_partition_and_offsets_are_contiguous(self, bus: Bus) -> None:
        batch = readings(meters=9, steps=5)
        with bus.producer() as producer:
            producer.send("readings", batch.table)
            producer.send("readings", batch.table)
        with bus.consumer("g", ["readings"]) as consumer:
            got = drain(consumer)
        parts: dict[str, set[int]] = {}
        next_offset: dict[int, int] = {}
        for m in got:
            for meter in set(m.table.column("meter_id").to_pylist()):
                parts.setdefault(meter, set()).add(m.partition)
            assert m.offset == next_offset.get(m.partition, m.offset)
            next_offset[m.partition] = m.next_offset
        assert all(len(p) == 1 for p in parts.values())
        assert rows(got).num_rows == 2 * len(batch)
        assert sum(next_offset.values()) - sum(
            min(m.offset for m in got if m.partition == p) for p in next_offset
        ) == span(got)

    def test_partition_for_is_stable(self) -> None:
        ids = pa.array(["a", "b", "a", None, "meter-42"])
        first = partition_for(ids, 8)
        assert first.tolist() == partition_for(ids, 8).tolist()
        assert first[0] == first[2] and first[3] == 0
        assert all(0 <= p < 8 for p in first)

    def test_committed_offsets_survive_a_new_consumer(self, bus: Bus) -> None:
        with bus.producer() as producer:
            producer.send("readings", readings(meters=4, steps=3).table)
        with bus.consumer("g", ["readings"]) as consumer:
            assert rows(drain(consumer)).num_rows == 12
        with bus.producer() as producer:
            producer.send("readings", readings(meters=4, steps=2, start="2024-02-01").table)
        with bus.consumer("g", ["readings"]) as consumer:
            assert rows(drain(consumer)).num_rows == 8
        assert bus.lag("g", "readings") == 0

    def test_uncommitted_messages_are_redelivered(self, bus: Bus) -> None:
        with bus.producer() as producer:
            producer.send("readings", readings(meters=4, steps=3).table)
        with bus.consumer("g", ["readings"]) as consumer:
            first = drain(consumer, commit=False)
            assert rows(first).num_rows == 12
        assert bus.lag("g", "readings") == span(first)
        with bus.consumer("g", ["readings"]) as consumer:
            again = drain(consumer)
            assert rows(again).num_rows == 12
        assert sorted((m.partition, m.offset) for m in again) == sorted(
            (m.partition, m.offset) for m in first
        )
        assert bus.lag("g", "readings") == 0

    def test_groups_are_independent(self, bus: Bus) -> None:
        with bus.producer() as producer:
            producer.send("readings", readings(meters=2, steps=3).table)
        for group in ("a", "b"):
            with bus.consumer(group, ["readings"]) as consumer:
                assert rows(drain(consumer)).num_rows == 6

    def test_members_on_threads_share_partitions_and_take_over_when_one_leaves(
        self, bus: Bus, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger="meterops.bus")
        partitions = len(bus.end_offsets("readings"))
        first, second = Member(bus), Member(bus)

        def shared() -> bool:
            a, b = first.consumer.assignment(), second.consumer.assignment()
            return bool(a and b and not a & b and len(a | b) == partitions)

        def members() -> list[set[TopicPartition]]:
            return sorted(bus.group_members("g").values(), key=sorted)

        first.start()
        second.start()
        try:
            assert wait_until(shared), (first.consumer.assignment(), second.consumer.assignment())
            a, b = first.consumer.assignment(), second.consumer.assignment()
            assert wait_until(lambda: members() == sorted([a, b], key=sorted)), members()
            logged = [r.getMessage() for r in caplog.records if r.name == "meterops.bus"]
            for owned in (a, b):
                listed = ", ".join(f"{t}/{p}" for t, p in sorted(owned))
                assert any(f"assigned partitions {listed}" in m for m in logged), logged

            before = readings(meters=40, steps=5)
            with bus.producer() as producer:
                producer.send("readings", before.table)
            assert wait_until(lambda: first.rows + second.rows >= len(before))
            assert first.rows and second.rows  # both did a share of the work
            assert {(m.topic, m.partition) for m in first.messages} <= a
            assert {(m.topic, m.partition) for m in second.messages} <= b

            first.leave()
            assert first.consumer.assignment() == set()
            assert wait_until(lambda: second.consumer.assignment() == a | b)
            assert wait_until(lambda: members() == [a | b]), members()
            after = readings(meters=40, steps=5, start="2024-02-01")
            with bus.producer() as producer:
                producer.send("readings", after.table)
            assert wait_until(lambda: first.rows + second.rows >= len(before) + len(after))
            second.leave()
        finally:
            for member in (first, second):
                member.leave()
        got = keys(first.messages + second.messages)
        sent = keys([Message("readings", 0, 0, t) for t in (before.table, after.table)])
        assert sorted(got) == sorted(sent)  # every row once: nothing lost, nothing twice
        assert bus.lag("g", "readings") == 0
        assert wait_until(lambda: bus.group_members("g") == {}), bus.group_members("g")

    def test_poll_waits_at_most_the_timeout_when_idle(self, bus: Bus) -> None:
        with bus.consumer("g", ["readings"]) as consumer:
            assert consumer.poll(10, 0.05) == []

    def test_covariates_and_nulls_travel_unchanged(self, bus: Bus) -> None:
        batch = readings(meters=1, steps=3, temperature=[1.5, None, -2.0])
        with bus.producer() as producer:
            producer.send("readings", batch.table)
        with bus.consumer("g", ["readings"]) as consumer:
            table = rows(drain(consumer))
        assert table.equals(batch.table)

    @pytest.mark.parametrize("topic", ["deadletters", "predictions"])
    def test_other_topics_exist(self, bus: Bus, topic: str) -> None:
        bus.create_topics([topic])
        assert sum(bus.end_offsets(topic).values()) == 0
