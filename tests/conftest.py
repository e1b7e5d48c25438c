"""Shared fixtures: settings for a temporary project and small reading batches."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meterops.settings import Settings, load_settings

pytest_plugins = ["tests.service_fixtures"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project directory (no meterops.toml)."""
    return tmp_path


@pytest.fixture
def make_settings(project: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return load_settings(None, project_dir=project, **overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(worker={"poll_timeout": 0.05})
