"""The CLI as a user meets it: garbage files, unreadable files, help, status, init."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.main import get_command

from meterops.cli import app
from tests.e2e.conftest import Run

pytestmark = pytest.mark.e2e

GARBAGE = (
    b"meter_id,ts,value\n"
    b"m-1,2024-01-01T00:00:00Z,1.5\n"
    b"m-1,2024-01-01T01:00:00Z,abc\n"  # text in value
    b"m-1,not-a-time,2.0\n"  # bad timestamp
    b"m-1,,2.0\n"  # missing timestamp
    b"m-1,2024-01-01T02:00:00Z,NaN\n"
    b"m-1,2024-01-01T03:00:00Z,inf\n"
    b",2024-01-01T04:00:00Z,3.0\n"  # empty meter id
    b"m-2,2024-01-01T00:00:00Z,1e12\n"
    b"m-2,2024-01-01T01:00:00Z,\xff\xfe\x00\x01junk\n"  # binary junk
    b"m-2;2024-01-01T02:00:00Z;4.0\n"  # wrong delimiter
    b"m-2,2024-01-01T03:00:00Z,4.5\n"
    b"m-2,2024-01-01T04:00:00Z,\n"  # a missing value is a missing reading, kept
    b"m-3,2024-01-01T00:00:00+02:00,7.0\n"
)


def test_garbage_rows_are_dead_lettered_with_reasons_and_good_rows_stored(
    profile: str, workdir: Path, cli: Run
) -> None:
    (workdir / "garbage.csv").write_bytes(GARBAGE)
    proc = cli("ingest", "garbage.csv")
    assert "stored 4 new" in proc.stdout and "9 dead letters" in proc.stdout
    status = json.loads(cli("status", "--format", "json").stdout)
    assert status["readings"] == 4 and status["deadletters"] == 9 and status["lag"] == 0
    by_reason = status["deadletters_by_reason"]
    assert by_reason.pop("unparseable value") + by_reason.pop("invalid encoding", 0) == 2
    assert by_reason == {
        "unparseable timestamp": 1,
        "missing timestamp": 1,
        "non-finite value": 2,
        "missing meter_id": 1,
        "value out of range": 1,
        "wrong column count": 1,
    }
    letters = json.loads(cli("deadletters", "list", "--format", "json").stdout)
    wrong = next(d for d in letters if d["reason"] == "wrong column count")
    assert wrong["raw"] == "m-2;2024-01-01T02:00:00Z;4.0"
    # Sending the same file again stores no reading twice; each rejected
    # delivery is its own dead letter (an audit of what was sent).
    again = cli("ingest", "garbage.csv")
    assert "stored 0 new, 4 duplicates, 9 dead letters" in again.stdout
    status = json.loads(cli("status", "--format", "json").stdout)
    assert status["readings"] == 4 and status["deadletters"] == 18


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "missing.csv"),
        ("empty.csv", b"", "empty.csv"),
        ("binary.parquet", b"PAR1\x00\x01\x02garbage", "binary.parquet"),
        ("columns.csv", b"a,b\n1,2\n", "--ts-col"),
        ("dir", "dir", "dir"),
    ],
)
def test_unreadable_files_give_one_line_and_exit_2(
    workdir: Path, cli: Run, name: str, content: bytes | str | None, message: str
) -> None:
    if content == "dir":
        (workdir / name).mkdir()
    elif isinstance(content, bytes):
        (workdir / name).write_bytes(content)
    proc = cli("ingest", name, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in proc.stderr


def test_gzip_and_column_mapping_with_time_zone(workdir: Path, cli: Run) -> None:
    body = b"time;kw\n2024-03-31 01:00:00;1.0\n2024-03-31 03:00:00;2.0\n"
    (workdir / "house.csv.gz").write_bytes(gzip.compress(body))
    cli(
        "ingest",
        "house.csv.gz",
        "--ts-col",
        "time",
        "--value-col",
        "kw",
        "--meter-id",
        "house-1",
        "--timezone",
        "Europe/Paris",
    )
    status = json.loads(cli("status", "--format", "json").stdout)
    assert status["readings"] == 2 and status["meters"] == 1
    assert status["last_ts"] == "2024-03-31T01:00:00+00:00"  # 03:00 CEST


def test_every_command_has_help_with_an_example() -> None:
    root = get_command(app)
    commands: list[tuple[str, object]] = []
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        sub = getattr(cmd, "commands", None)
        if sub:
            commands.extend((f"{name} {s}", c) for s, c in sub.items())
        else:
            commands.append((name, cmd))
    assert len(commands) >= 10
    for name, cmd in commands:
        assert "Example" in (cmd.help or ""), f"meterops {name} --help has no example"  # type: ignore[attr-defined]


def test_init_writes_config_and_refuses_to_overwrite(tmp_path: Path, cli: Run) -> None:
    target = tmp_path / "proj"
    cli("init", str(target))
    assert (target / "meterops.toml").read_text().startswith("# meterops project configuration")
    proc = cli("init", str(target), check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_config_flag_before_or_after_the_command(workdir: Path, cli: Run, tmp_path: Path) -> None:
    cfg = str(workdir / "meterops.toml")
    before = json.loads(cli("--config", cfg, "status", "--format", "json").stdout)
    after = json.loads(cli("status", "--config", cfg, "--format", "json").stdout)
    assert before == after
    bad = cli("status", "--config", str(tmp_path / "nope.toml"), check=False)
    assert bad.returncode == 2 and "meterops init" in bad.stderr


def test_cluster_stores_a_cluster_per_meter(profile: str, workdir: Path, cli: Run) -> None:
    from meterops.pipeline import Pipeline
    from meterops.settings import load_settings

    cli("simulate", "--meters", "12", "--days", "14", "--seed", "4", "--out", "fleet.csv")
    cli("ingest", "fleet.csv")
    doc = json.loads(cli("cluster", "--format", "json").stdout)
    assert doc["source"] == "store" and doc["saved"] is True
    assert doc["meters"] == doc["clustered"] == 12 and doc["k"] >= 2
    with Pipeline(load_settings(workdir / "meterops.toml")) as pipe:
        meters = pipe.store.meters()
    assert len(meters) == 12 and meters["cluster"].notna().all()
    stored = dict(zip(meters["meter_id"], meters["cluster"].astype(int), strict=True))
    assert stored == doc["assignments"]
    # again with a given k: the stored clusters follow the latest run
    cli("cluster", "--k", "2")
    with Pipeline(load_settings(workdir / "meterops.toml")) as pipe:
        assert set(pipe.store.meters()["cluster"].astype(int)) == {0, 1}
