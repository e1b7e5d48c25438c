"""The public API does not drift: what modules export is listed and exists."""

from __future__ import annotations

import importlib
import pkgutil

import meterops


def test_top_level_exports() -> None:
    assert sorted(meterops.__all__) == [
        "MeterOpsError",
        "Pipeline",
        "ReadingBatch",
        "Settings",
        "__version__",
        "load_settings",
    ]
    for name in meterops.__all__:
        assert getattr(meterops, name) is not None


def test_every_module_declares_all_and_it_resolves() -> None:
    for info in pkgutil.walk_packages(meterops.__path__, "meterops."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        exported = getattr(module, "__all__", None)
        if info.ispkg:
            continue
        assert exported is not None, f"{info.name} has no __all__"
        for name in exported:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name}"
