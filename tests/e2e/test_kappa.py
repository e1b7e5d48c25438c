"""The Kappa-stream scenario end to end: a vehicle table through the bus, RMSE per micro-batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Run

pytestmark = pytest.mark.e2e

VEHICLES = str(Path(__file__).resolve().parents[2] / "data" / "vehicles_co2.csv")
KEYS = {
    "batch",
    "n",
    "scored",
    "seen",
    "rmse",
    "mae",
    "cum_rmse",
    "baseline_rmse",
    "baseline_mae",
    "baseline_cum_rmse",
}


def _lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_vehicle_co2_stream_learns_per_micro_batch(profile: str, cli: Run) -> None:
    proc = cli("replay", VEHICLES, "--target", "co2_g_km", "--format", "json")
    scores = _lines(proc.stdout)
    assert len(scores) == 12  # 234 rows in micro-batches of 20
    assert all(set(s) == KEYS for s in scores)
    assert [s["batch"] for s in scores] == list(range(1, 13))
    assert [s["n"] for s in scores] == [20] * 11 + [14]
    assert [s["seen"] for s in scores] == list(range(0, 234, 20))
    first, last = scores[0], scores[-1]
    assert first["scored"] == 0 and first["rmse"] is None and first["cum_rmse"] is None
    assert all(s["scored"] == s["n"] and s["rmse"] > 0 for s in scores[1:])
    assert last["cum_rmse"] < 0.6 * last["baseline_cum_rmse"]
    assert "micro-batches of 20 rows" in proc.stderr and "running-mean baseline" in proc.stderr

    # Run again in the same project, shuffled: its own rows only, a new order.
    again = _lines(
        cli(
            "replay",
            VEHICLES,
            "--target",
            "co2_g_km",
            "--format",
            "json",
            "--shuffle",
            "--seed",
            "3",
            "--batch-rows",
            "50",
            "--features",
            "displ,cyl,year,drv,fl,class",
        ).stdout
    )
    assert [s["n"] for s in again] == [50, 50, 50, 50, 34]
    assert again[-1]["cum_rmse"] < 0.6 * again[-1]["baseline_cum_rmse"]

    table = cli("replay", VEHICLES, "--target", "co2_g_km").stdout.splitlines()
    assert table[1].split()[:3] == ["batch", "n", "seen"] and len(table) == 1 + 1 + 12 + 1
    assert table[-1].startswith("online ridge: cumulative RMSE")


@pytest.mark.parametrize(
    ("args", "content", "message"),
    [
        (["--target", "co2"], None, "no target column 'co2'"),
        (["--target", "fl"], None, "the target 'fl' is not numeric (e.g. 'p' in data row 1)"),
        (["--target", "co2_g_km", "--features", "displ,weight"], None, "'weight'"),
        (["--target", "y"], b"", "the file is empty"),
        (["--target", "y"], b"a,y\n", "no data rows"),
        (["--target", "co2_g_km", "--speed", "10"], None, "--speed applies to readings"),
        (["--batch-rows", "5"], None, "--batch-rows needs --target"),
        (["--target", "co2_g_km", "--format", "csv"], None, "unknown --format 'csv'"),
    ],
)
def test_tabular_mistakes_give_one_line_and_exit_2(
    workdir: Path, cli: Run, args: list[str], content: bytes | None, message: str
) -> None:
    path = VEHICLES
    if content is not None:
        (workdir / "table.csv").write_bytes(content)
        path = "table.csv"
    proc = cli("replay", path, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
