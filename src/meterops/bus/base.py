"""The bus role: durable topics of columnar batches, partitioned by meter.

Promises every implementation keeps (checked by ``tests/contracts/test_bus.py``):

* ``Producer.send`` splits a table by ``partition_for(meter_id)`` so one
  meter's readings always land, in order, in one partition. Rows are durable
  when ``flush()`` (or ``close()``) returns, which raises if any failed: the
  embedded log has written them to the OS by the time ``send`` returns (with
  ``fsync`` on: to disk); Kafka once the broker acknowledged them.
* A :class:`Consumer` belongs to a group; the group's members share the
  partitions, each partition owned by one live member at a time. ``poll``
  delivers messages from the committed offset on, in offset order.
* Delivery is at least once: ``commit`` is called after the results of a
  message are stored; a message not committed when its consumer dies is
  delivered again to the next owner of its partition.
* Assignment changes are logged at INFO on the ``meterops.bus`` logger
  ("group workers, member ...: assigned partitions readings/0, readings/2"),
  and :meth:`Consumer.assignment` answers from any thread without a round
  trip; :meth:`Bus.group_members` tells who owns what from outside.

A consumer is used by one thread at a time (the one polling it); several
consumers of one group may run in threads of one process or in processes.
"""

from __future__ import annotations

import logging
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from meterops.types import Message

__all__ = [
    "DEADLETTERS",
    "PREDICTIONS",
    "READINGS",
    "TOPICS",
    "Bus",
    "Consumer",
    "Producer",
    "TopicPartition",
    "describe_partitions",
    "log_assignment_change",
    "partition_for",
    "split_by_partition",
]

_assignment_log = logging.getLogger("meterops.bus")

READINGS = "readings"
PREDICTIONS = "predictions"
DEADLETTERS = "deadletters"
TOPICS = (READINGS, PREDICTIONS, DEADLETTERS)

TopicPartition = tuple[str, int]


def partition_for(meter_ids: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """Partition number of every row: CRC-32 of the meter id modulo ``partitions``.

    Hashes each distinct meter once (a batch holds few meters and many rows),
    so the cost per row is one array lookup. Stable across processes and
    machines, unlike Python's ``hash``. Null ids go to partition 0.
    """
    encoded = pc.dictionary_encode(meter_ids)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    uniques = encoded.dictionary.to_pylist()
    table = np.fromiter(
        (zlib.crc32(m.encode("utf-8", "surrogatepass")) % partitions for m in uniques),
        dtype=np.int32,
        count=len(uniques),
    )
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    if encoded.indices.null_count:
        valid = ~np.asarray(pc.is_null(encoded.indices))
        out = np.zeros(len(indices), dtype=np.int32)
        out[valid] = table[indices[valid].astype(np.int64)]
        return out
    return table[indices.astype(np.int64)] if len(indices) else np.zeros(0, np.int32)


def split_by_partition(table: pa.Table, partitions: int) -> Iterable[tuple[int, pa.Table]]:
    """The rows of ``table`` grouped by partition, order kept within each group."""
    if table.num_rows == 0:
        return []
    parts = partition_for(table.column("meter_id"), partitions)
    order = np.argsort(parts, kind="stable")
    sorted_parts = parts[order]
    bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(order)]))
    taken = table.take(pa.array(order))
    return [
        (int(sorted_parts[s]), taken.slice(s, e - s)) for s, e in zip(starts, ends, strict=True)
    ]


def describe_partitions(partitions: Iterable[TopicPartition]) -> str:
    """``"readings/0, readings/2"`` (sorted), or ``"none"``.

    >>> describe_partitions({("readings", 2), ("readings", 0)})
    'readings/0, readings/2'
    """
    return ", ".join(f"{t}/{p}" for t, p in sorted(partitions)) or "none"


def log_assignment_change(
    group: str,
    member: str,
    before: Iterable[TopicPartition],
    after: Iterable[TopicPartition],
    why: str = "",
) -> None:
    """Log a member's new assignment at INFO on ``meterops.bus`` (nothing when unchanged)."""
    old, new = set(before), set(after)
    if old == new:
        return
    changes = []
    if new - old:
        changes.append(f"added {describe_partitions(new - old)}")
    if old - new:
        changes.append(f"{why or 'released'} {describe_partitions(old - new)}")
    _assignment_log.info(
        "group %s, member %s: assigned partitions %s (%s)",
        group,
        member,
        describe_partitions(new),
        "; ".join(changes),
    )


class _Closing:
    def close(self) -> None:  # pragma: no cover - overridden
        """Release resources; safe to call twice."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Producer(_Closing, ABC):
    """Appends tables to topics."""

    @abstractmethod
    def send(self, topic: str, table: pa.Table) -> int:
        """Append ``table`` (must have ``meter_id``) to ``topic``; returns rows sent."""

    def flush(self) -> None:
        """Block until everything sent is durable (a no-op where send already is)."""


class Consumer(_Closing, ABC):
    """A member of a consumer group reading some topics."""

    @abstractmethod
    def poll(self, max_rows: int, timeout: float) -> list[Message]:
        """Up to about ``max_rows`` rows of new messages; waits up to ``timeout`` s for any.

        Also where the member keeps its partition assignment up to date.
        """

    @abstractmethod
    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Record ``next offset`` per partition: called after results are stored."""

    @abstractmethod
    def assignment(self) -> set[TopicPartition]:
        """The partitions this member owns, as of its last ``poll``; empty once closed.

        Answered from the member's own bookkeeping, without a round trip, so
        any thread may ask while another one polls.
        """


class Bus(_Closing, ABC):
    """Factory for producers and consumers plus the admin questions ``status`` asks."""

    def open(self) -> Self:
        """Connect / create directories; call before anything else."""
        return self

    @abstractmethod
    def create_topics(self, topics: Iterable[str]) -> None:
        """Create topics that do not exist yet (partitions, retention from settings)."""

    @abstractmethod
    def producer(self) -> Producer: ...

    @abstractmethod
    def consumer(self, group: str, topics: Iterable[str]) -> Consumer: ...

    @abstractmethod
    def end_offsets(self, topic: str) -> dict[int, int]:
        """Next offset to be written, per partition."""

    @abstractmethod
    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed next offsets (start of the log where none)."""

    @abstractmethod
    def group_members(self, group: str) -> dict[str, set[TopicPartition]]:
        """The live members of ``group`` and the partitions each owns (one cheap request).

        Keys are member ids that start with the member's process id on the
        embedded bus and with its ``client.id`` (``meterops-<pid>`` by
        default) on Kafka. During a rebalance a member may briefly own nothing.
        """

    def lag(self, group: str, topic: str) -> int:
        """Rows written to ``topic`` that ``group`` has not committed yet."""
        done = self.committed(group, topic)
        return sum(max(0, end - done.get(p, 0)) for p, end in self.end_offsets(topic).items())
