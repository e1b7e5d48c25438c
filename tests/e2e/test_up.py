"""`meterops up` starts the embedded loop and readings flow within seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Run, cli_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_up_shows_readings_flowing_and_stops_cleanly_on_ctrl_c(workdir: Path, cli: Run) -> None:
    up = subprocess.Popen(
        cli_command("up", "--meters", "20"),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(seen)) < 3:
            time.sleep(1)
            status = json.loads(cli("status", "--format", "json").stdout)
            seen.append(status["readings"])
        meters = status["meters"]
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=30)
    assert len(set(seen)) >= 3 and seen == sorted(seen), f"readings did not grow: {seen}"
    assert meters == 21  # 20 simulated meters and the real household
    assert up.returncode == 0
    assert "stopped" in output
    assert "Traceback" not in output
