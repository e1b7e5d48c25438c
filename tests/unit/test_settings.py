"""Settings precedence, duration parsing, path resolution and clear errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from meterops.errors import ConfigError
from meterops.settings import DEFAULT_TOML, load_settings, parse_duration


def test_default_toml_loads_and_matches_defaults(tmp_path: Path) -> None:
    (tmp_path / "meterops.toml").write_text(DEFAULT_TOML)
    loaded = load_settings(tmp_path / "meterops.toml")
    assert loaded.project_dir == tmp_path.resolve()
    assert loaded.bus == load_settings(None, project_dir=tmp_path).bus


def test_precedence_toml_env_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "meterops.toml"
    cfg.write_text("[bus]\npartitions = 3\nretention = '2d'\n")
    assert load_settings(cfg).bus.partitions == 3
    monkeypatch.setenv("METEROPS_BUS__PARTITIONS", "5")
    loaded = load_settings(cfg)
    assert loaded.bus.partitions == 5 and loaded.bus.retention == "2d"
    assert load_settings(cfg, bus={"partitions": 7}).bus.partitions == 7


def test_relative_urls_resolve_against_the_config_dir(tmp_path: Path) -> None:
    cfg = tmp_path / "meterops.toml"
    cfg.write_text(DEFAULT_TOML)
    s = load_settings(cfg)
    assert s.resolve(s.backends.store) == f"sqlite://{tmp_path.resolve()}/.meterops/meterops.db"
    assert s.resolve(s.backends.bus) == f"local://{tmp_path.resolve()}/.meterops/bus"
    assert s.resolve("kafka://127.0.0.1:9092") == "kafka://127.0.0.1:9092"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30min", pd.Timedelta(minutes=30)),
        ("24h", pd.Timedelta(hours=24)),
        ("1d", pd.Timedelta(days=1)),
        ("2w", pd.Timedelta(weeks=2)),
        (90, pd.Timedelta(seconds=90)),
    ],
)
def test_durations(text: str | int, expected: pd.Timedelta) -> None:
    assert parse_duration(text) == expected


def test_bad_values_name_the_key_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "meterops.toml"
    cfg.write_text("[bus]\npartitions = 0\n")
    with pytest.raises(ConfigError, match=r"meterops.toml.*bus.partitions"):
        load_settings(cfg)
    cfg.write_text("[validation]\nmax_future = 'soon'\n")
    with pytest.raises(ConfigError, match="max_future"):
        load_settings(cfg)
    cfg.write_text("[nope]\nx = 1\n")
    with pytest.raises(ConfigError, match="nope"):
        load_settings(cfg)
    cfg.write_text("not toml [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="meterops init"):
        load_settings(tmp_path / "missing.toml")
