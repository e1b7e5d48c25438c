"""What only the embedded log has to prove: crash recovery, retention, processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from meterops.bus.local import LocalBus
from tests.helpers import readings


def consume_all(bus: LocalBus, group: str = "g") -> pa.Table:
    tables: list[pa.Table] = []
    with bus.consumer(group, ["readings"]) as consumer:
        while batch := consumer.poll(10_000, 0.3):
            tables.extend(m.table for m in batch)
            consumer.commit({(m.topic, m.partition): m.next_offset for m in batch})
    return pa.concat_tables(tables) if tables else pa.table({})


def test_a_torn_tail_is_ignored_by_readers_and_cut_by_the_next_writer(tmp_path: Path) -> None:
    bus = LocalBus(tmp_path, partitions=1).open()
    with bus.producer() as p:
        p.send("readings", readings(meters=1, steps=3).table)
    pdir = tmp_path / "topics" / "readings" / "0"
    log = next(pdir.glob("*.log"))
    idx = next(pdir.glob("*.idx"))
    with log.open("ab") as f:  # a writer died mid-frame ...
        f.write(b"MOB1\x00\x10garbage")
    with idx.open("ab") as f:  # ... and mid index entry
        f.write(b"\x01\x02\x03")
    assert consume_all(bus, "early").num_rows == 3
    with bus.producer() as p:
        p.send("readings", readings(meters=1, steps=2, start="2024-02-01").table)
    assert consume_all(bus, "late").num_rows == 5
    assert bus.end_offsets("readings") == {0: 5}


def test_segments_roll_and_retention_drops_old_ones(tmp_path: Path) -> None:
    bus = LocalBus(tmp_path, partitions=1, segment_bytes=2048, retention_s=3600).open()
    with bus.producer() as p:
        for i in range(10):
            p.send("readings", readings(meters=1, steps=20, start=f"2024-01-{i + 1:02d}").table)
    pdir = tmp_path / "topics" / "readings" / "0"
    segments = sorted(pdir.glob("*.log"))
    assert len(segments) > 2
    assert consume_all(bus, "all").num_rows == 200
    old = time.time() - 7200
    for seg in segments[:-1]:
        os.utime(seg, (old, old))
    bus.enforce_retention()
    assert sorted(pdir.glob("*.log")) == segments[-1:]
    # A group that never committed resumes at the earliest offset still kept.
    start = int(segments[-1].stem)
    assert bus.committed("fresh", "readings") == {0: start}
    assert consume_all(bus, "fresh").num_rows == 200 - start


def test_producers_in_other_processes_interleave_safely(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from meterops.bus.local import LocalBus;"
        "from tests.helpers import readings;"
        "bus = LocalBus(Path(sys.argv[1]), partitions=2).open(); p = bus.producer();"
        "start = f'202{sys.argv[2]}-01-01';"
        "[p.send('readings', readings(meters=5, steps=10, seed=i, start=start).table)"
        " for i in range(20)]"
    )
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(k)], cwd=root)
        for k in range(3)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    bus = LocalBus(tmp_path, partitions=2).open()
    assert consume_all(bus).num_rows == 3 * 20 * 50


def test_a_member_killed_with_sigkill_hands_its_partitions_over_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No heartbeat to miss: the kernel drops a dead process's flocks, the survivor sees it."""
    caplog.set_level(logging.INFO, logger="meterops.bus")
    code = (
        "import sys, time; from pathlib import Path; from meterops.bus.local import LocalBus;"
        "c = LocalBus(Path(sys.argv[1]), partitions=4).open().consumer('g', ['readings']);"
        "[c.poll(10, 0.1) for _ in range(20)]; print('ready', flush=True); time.sleep(600)"
    )
    root = Path(__file__).resolve().parents[2]
    bus = LocalBus(tmp_path, partitions=4).open()
    everything = {("readings", p) for p in range(4)}
    with bus.consumer("g", ["readings"]) as survivor:
        other = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE
        )
        try:
            assert other.stdout is not None and other.stdout.readline() == b"ready\n"
            deadline = time.monotonic() + 10
            while len(bus.group_members("g")) < 2 or len(survivor.assignment()) != 2:
                assert time.monotonic() < deadline, bus.group_members("g")
                survivor.poll(10, 0.1)
            members = bus.group_members("g")
            theirs = members[next(m for m in members if m.startswith(f"{other.pid}-"))]
            assert theirs == everything - survivor.assignment()
            other.kill()
            other.wait(timeout=10)
            killed = time.monotonic()
            while survivor.assignment() != everything:
                assert time.monotonic() - killed < 2, survivor.assignment()
                survivor.poll(10, 0.1)
        finally:
            if other.poll() is None:
                other.kill()
            other.wait(timeout=10)
            if other.stdout is not None:
                other.stdout.close()
        assert bus.group_members("g") == {survivor.member_id: everything}
    assert bus.group_members("g") == {}
    logged = [r.getMessage() for r in caplog.records if r.name == "meterops.bus"]
    assert any(
        "assigned partitions readings/0, readings/1, readings/2, readings/3" in m for m in logged
    ), logged
