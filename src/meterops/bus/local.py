"""The embedded bus: a durable log on the local file system, safe across processes.

Layout under the root directory::

    topics/<topic>/meta.json              {"partitions": N}
    topics/<topic>/<p>/<base>.log         frames: header + Arrow IPC stream
    topics/<topic>/<p>/<base>.idx         24-byte entries (base, position, rows, length)
    topics/<topic>/<p>/.lock              writers append under an exclusive flock
    groups/<group>/members/<id>.lock      held (flock) by each live member
    groups/<group>/<topic>/<p>.owner      held (flock) by the member owning p, holds its id
    groups/<group>/<topic>/<p>.offset     committed next offset (atomic rename)

Why flock: the kernel drops a dead process's locks, so a ``kill -9``'d worker
frees its partitions and membership at once, with no heartbeat protocol. The
index is the source of truth: a frame is visible only once its index entry is
complete, and a writer truncates any torn tail before it appends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa

from meterops.bus.base import (
    Bus,
    Consumer,
    Producer,
    TopicPartition,
    log_assignment_change,
    split_by_partition,
)
from meterops.errors import BackendError
from meterops.settings import Settings, parse_duration
from meterops.types import Message

__all__ = ["LocalBus", "build"]

_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32 (crc unused on read)
_MAGIC = b"MOB1"
_INDEX = np.dtype([("base", "<u8"), ("pos", "<u8"), ("rows", "<u4"), ("length", "<u4")])
_REBALANCE_EVERY = 0.5


def build(url: str, settings: Settings) -> LocalBus:
    """Builder for ``local:///path/to/dir``."""
    return LocalBus(
        Path(url.partition("://")[2]),
        partitions=settings.bus.partitions,
        segment_bytes=settings.bus.segment_bytes,
        retention_s=parse_duration(settings.bus.retention).total_seconds(),
        fsync=settings.bus.fsync,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None if someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _held(path: Path) -> bool:
    """Whether someone holds the flock on ``path`` (a missing file is not held)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _segments(pdir: Path) -> list[int]:
    return sorted(int(n[:-4]) for n in os.listdir(pdir) if n.endswith(".idx"))


def _read_index(path: Path, start_entry: int = 0) -> np.ndarray:
    try:
        with path.open("rb") as f:
            f.seek(start_entry * _INDEX.itemsize)
            raw = f.read()
    except FileNotFoundError:
        return np.zeros(0, _INDEX)
    usable = len(raw) - len(raw) % _INDEX.itemsize
    return np.frombuffer(raw[:usable], _INDEX)


def _encode(table: pa.Table) -> pa.Buffer:
    """The IPC stream of ``table``, in Arrow's buffer (written out without a copy)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _decode(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


class _Partition:
    """Paths and append logic of one partition directory."""

    def __init__(self, root: Path, topic: str, partition: int) -> None:
        self.dir = root / "topics" / topic / str(partition)
        self.lock = self.dir / ".lock"

    def append(self, payload: pa.Buffer, rows: int, segment_bytes: int, fsync: bool) -> int:
        """Append one frame; returns its base offset. Caller holds no lock."""
        with _locked(self.lock):
            segs = _segments(self.dir)
            base = segs[-1] if segs else 0
            if not segs:
                (self.dir / f"{base:020d}.idx").touch()
            idx_path = self.dir / f"{base:020d}.idx"
            log_path = self.dir / f"{base:020d}.log"
            entries = _read_index(idx_path)
            end = int(entries[-1]["pos"] + entries[-1]["length"]) if len(entries) else 0
            next_offset = int(entries[-1]["base"] + entries[-1]["rows"]) if len(entries) else base
            if end >= segment_bytes:
                base, end, entries = next_offset, 0, entries[:0]
                idx_path = self.dir / f"{base:020d}.idx"
                log_path = self.dir / f"{base:020d}.log"
            frame_bytes = _HEADER.size + payload.size
            with log_path.open("r+b" if log_path.exists() else "wb") as log:
                log.truncate(end)  # drop a torn frame left by a crashed writer
                log.seek(end)
                log.write(_HEADER.pack(_MAGIC, payload.size, 0))
                log.write(memoryview(payload))
                log.flush()
                if fsync:
                    os.fsync(log.fileno())
            entry = np.array([(next_offset, end, rows, frame_bytes)], _INDEX).tobytes()
            with idx_path.open("r+b" if idx_path.exists() else "wb") as idx:
                idx.truncate(len(entries) * _INDEX.itemsize)
                idx.seek(0, os.SEEK_END)
                idx.write(entry)
                idx.flush()
                if fsync:
                    os.fsync(idx.fileno())
            return next_offset

    def end_offset(self) -> int:
        segs = _segments(self.dir) if self.dir.exists() else []
        if not segs:
            return 0
        entries = _read_index(self.dir / f"{segs[-1]:020d}.idx")
        return int(entries[-1]["base"] + entries[-1]["rows"]) if len(entries) else segs[-1]

    def start_offset(self) -> int:
        segs = _segments(self.dir) if self.dir.exists() else []
        return segs[0] if segs else 0

    def enforce_retention(self, retention_s: float) -> None:
        """Delete whole segments older than the retention, never the active one."""
        cutoff = time.time() - retention_s
        with _locked(self.lock):
            for base in _segments(self.dir)[:-1]:
                log = self.dir / f"{base:020d}.log"
                if log.exists() and log.stat().st_mtime < cutoff:
                    (self.dir / f"{base:020d}.idx").unlink(missing_ok=True)
                    log.unlink(missing_ok=True)


class _Reader:
    """A position in one partition's log, reading frames from a given offset."""

    def __init__(self, part: _Partition, offset: int) -> None:
        self.part = part
        self.offset = offset
        self._segment: int | None = None
        self._entry = 0  # next index entry to read within the segment

    def _seek(self) -> bool:
        segs = _segments(self.part.dir)
        if not segs:
            return False
        if self.offset < segs[0]:
            self.offset = segs[0]  # retention removed what we had not read: resume earliest
        candidates = [s for s in segs if s <= self.offset]
        self._segment = candidates[-1] if candidates else segs[0]
        entries = _read_index(self.part.dir / f"{self._segment:020d}.idx")
        ends = entries["base"].astype(np.int64) + entries["rows"].astype(np.int64)
        self._entry = int(np.searchsorted(ends, self.offset, side="right"))
        return True

    def read(self, max_rows: int) -> list[tuple[int, pa.Table]]:
        if self._segment is None and not self._seek():
            return []
        out: list[tuple[int, pa.Table]] = []
        rows = 0
        while rows < max_rows:
            if self._segment is None:  # pragma: no cover - set above
                break
            idx = self.part.dir / f"{self._segment:020d}.idx"
            entries = _read_index(idx, self._entry)
            if len(entries) == 0:
                later = [s for s in _segments(self.part.dir) if s > self._segment]
                if not later:
                    break
                self._segment, self._entry = later[0], 0
                continue
            log = self.part.dir / f"{self._segment:020d}.log"
            try:
                fh = log.open("rb")
            except FileNotFoundError:  # deleted by retention under our feet
                self._segment = None
                if not self._seek():
                    break
                continue
            with fh:
                for e in entries:
                    fh.seek(int(e["pos"]))
                    frame = fh.read(int(e["length"]))
                    magic, length, _ = _HEADER.unpack_from(frame)
                    if magic != _MAGIC or length != len(frame) - _HEADER.size:
                        raise BackendError(f"corrupt frame in {log} at {int(e['pos'])}")
                    table = _decode(frame[_HEADER.size :])
                    base = int(e["base"])
                    self._entry += 1
                    if base + table.num_rows <= self.offset:
                        continue
                    if base < self.offset:  # resume inside a frame
                        table = table.slice(self.offset - base)
                        base = self.offset
                    out.append((base, table))
                    self.offset = base + table.num_rows
                    rows += table.num_rows
                    if rows >= max_rows:
                        break
        return out


class LocalProducer(Producer):
    def __init__(self, bus: LocalBus) -> None:
        self._bus = bus

    def send(self, topic: str, table: pa.Table) -> int:
        n = self._bus.partitions_of(topic)
        for partition, part_table in split_by_partition(table, n):
            self._bus._partition(topic, partition).append(
                _encode(part_table), part_table.num_rows, self._bus.segment_bytes, self._bus.fsync
            )
        return int(table.num_rows)


class LocalConsumer(Consumer):
    def __init__(self, bus: LocalBus, group: str, topics: Iterable[str]) -> None:
        self._bus = bus
        self._group = group
        self._topics = list(topics)
        for t in self._topics:
            bus.partitions_of(t)  # create on subscribe
        self._gdir = bus.root / "groups" / group
        (self._gdir / "members").mkdir(parents=True, exist_ok=True)
        self.member_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = _try_lock(self._gdir / "members" / f"{self.member_id}.lock")
        if fd is None:  # pragma: no cover - a fresh uuid cannot be held
            raise BackendError("could not register consumer group member")
        self._member_fd: int | None = fd
        self._owned: dict[TopicPartition, int] = {}  # -> fd holding the owner lock
        self._readers: dict[TopicPartition, _Reader] = {}
        self._last_rebalance = 0.0

    # -- membership -------------------------------------------------------
    def _alive_members(self) -> list[str]:
        alive = []
        mdir = self._gdir / "members"
        for name in sorted(os.listdir(mdir)):
            member = name.removesuffix(".lock")
            if member == self.member_id:
                alive.append(member)
                continue
            fd = _try_lock(mdir / name)
            if fd is None:
                alive.append(member)
            else:  # its process is gone: clean up
                with contextlib.suppress(FileNotFoundError):
                    (mdir / name).unlink()
                os.close(fd)
        return alive

    def _rebalance(self) -> None:
        before = set(self._owned)
        members = self._alive_members()
        everything = [(t, p) for t in self._topics for p in range(self._bus.partitions_of(t))]
        rank = members.index(self.member_id)
        share = len(everything) // len(members) + (rank < len(everything) % len(members))
        while len(self._owned) > share:
            self._release(max(self._owned))
        for tp in everything:
            if len(self._owned) >= share:
                break
            if tp in self._owned:
                continue
            path = self._gdir / tp[0] / f"{tp[1]}.owner"
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _try_lock(path)
            if fd is not None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self.member_id.encode(), 0)  # for Bus.group_members
                self._owned[tp] = fd
                start = self._bus.committed_offset(self._group, *tp)
                self._readers[tp] = _Reader(self._bus._partition(*tp), start)
        self._last_rebalance = time.monotonic()
        log_assignment_change(self._group, self.member_id, before, self._owned)

    def _release(self, tp: TopicPartition) -> None:
        fd = self._owned.pop(tp)
        os.ftruncate(fd, 0)  # an owner file names its member only while locked
        os.close(fd)
        self._readers.pop(tp, None)

    # -- consumer API ------------------------------------------------------
    def assignment(self) -> set[TopicPartition]:
        return set(self._owned)

    def poll(self, max_rows: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() - self._last_rebalance >= _REBALANCE_EVERY:
                self._rebalance()
            out: list[Message] = []
            budget = max_rows
            # Rotate the starting partition so one busy partition cannot starve others.
            tps = sorted(self._readers)
            if tps:
                shift = int(time.monotonic() * 1000) % len(tps)
                tps = tps[shift:] + tps[:shift]
            for tp in tps:
                if budget <= 0:
                    break
                for base, table in self._readers[tp].read(budget):
                    out.append(Message(tp[0], tp[1], base, table))
                    budget -= table.num_rows
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        for (topic, partition), offset in offsets.items():
            if (topic, partition) not in self._owned:
                continue  # lost the partition meanwhile: its new owner redoes the work
            path = self._gdir / topic / f"{partition}.offset"
            _atomic_write(path, str(int(offset)))

    def close(self) -> None:
        """Release the partitions and leave the group; the others take over at their next poll."""
        before = set(self._owned)
        for tp in list(self._owned):
            self._release(tp)
        log_assignment_change(self._group, self.member_id, before, (), "left the group, released")
        if self._member_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._gdir / "members" / f"{self.member_id}.lock").unlink()
            os.close(self._member_fd)
            self._member_fd = None


class LocalBus(Bus):
    """See the module docstring."""

    def __init__(
        self,
        root: Path,
        *,
        partitions: int = 4,
        segment_bytes: int = 64 * 1024 * 1024,
        retention_s: float = 7 * 86400,
        fsync: bool = False,
    ) -> None:
        self.root = root
        self.default_partitions = partitions
        self.segment_bytes = segment_bytes
        self.retention_s = retention_s
        self.fsync = fsync
        self._partitions: dict[str, int] = {}

    def open(self) -> LocalBus:
        try:
            (self.root / "topics").mkdir(parents=True, exist_ok=True)
            (self.root / "groups").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create the bus directory {self.root}: {exc}") from exc
        return self

    def _partition(self, topic: str, partition: int) -> _Partition:
        return _Partition(self.root, topic, partition)

    def partitions_of(self, topic: str) -> int:
        """Partition count of ``topic``, creating the topic on first use."""
        if topic not in self._partitions:
            self.create_topics([topic])
        return self._partitions[topic]

    def create_topics(self, topics: Iterable[str]) -> None:
        for topic in topics:
            tdir = self.root / "topics" / topic
            meta = tdir / "meta.json"
            if not meta.exists():
                tdir.mkdir(parents=True, exist_ok=True)
                with _locked(tdir / ".create.lock"):
                    if not meta.exists():
                        for p in range(self.default_partitions):
                            (tdir / str(p)).mkdir(exist_ok=True)
                        _atomic_write(meta, json.dumps({"partitions": self.default_partitions}))
            self._partitions[topic] = int(json.loads(meta.read_text())["partitions"])

    def topics(self) -> list[str]:
        tdir = self.root / "topics"
        return sorted(p.name for p in tdir.iterdir() if (p / "meta.json").exists())

    def producer(self) -> LocalProducer:
        return LocalProducer(self)

    def consumer(self, group: str, topics: Iterable[str]) -> LocalConsumer:
        return LocalConsumer(self, group, topics)

    def end_offsets(self, topic: str) -> dict[int, int]:
        n = self.partitions_of(topic)
        return {p: self._partition(topic, p).end_offset() for p in range(n)}

    def committed_offset(self, group: str, topic: str, partition: int) -> int:
        path = self.root / "groups" / group / topic / f"{partition}.offset"
        try:
            return int(path.read_text())
        except FileNotFoundError:
            return self._partition(topic, partition).start_offset()

    def committed(self, group: str, topic: str) -> dict[int, int]:
        n = self.partitions_of(topic)
        return {p: self.committed_offset(group, topic, p) for p in range(n)}

    def group_members(self, group: str) -> dict[str, set[TopicPartition]]:
        """Members whose lock is held, with the partitions whose owner file names them."""
        gdir = self.root / "groups" / group
        try:
            names = sorted(os.listdir(gdir / "members"))
        except FileNotFoundError:
            return {}
        members: dict[str, set[TopicPartition]] = {}
        for name in names:
            if _held(gdir / "members" / name):  # a dead member's lock is free
                members[name.removesuffix(".lock")] = set()
        for topic_dir in gdir.iterdir():
            if not topic_dir.is_dir() or topic_dir.name == "members":
                continue
            for owner in topic_dir.glob("*.owner"):
                member = owner.read_text(encoding="utf-8", errors="replace").strip()
                if member in members:
                    members[member].add((topic_dir.name, int(owner.stem)))
        return members

    def enforce_retention(self) -> None:
        """Drop expired segments of every topic (workers call this now and then)."""
        for topic in self.topics():
            for p in range(self.partitions_of(topic)):
                self._partition(topic, p).enforce_retention(self.retention_s)
