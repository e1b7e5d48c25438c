"""URL scheme -> backend builder, one tiny registry per role.

Builders import their driver lazily, so the embedded defaults never pay for
(or require) Kafka or PostgreSQL drivers; an unknown scheme fails with the
list of valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING

from meterops.errors import UnknownScheme

if TYPE_CHECKING:
    from meterops.bus.base import Bus
    from meterops.settings import Settings
    from meterops.store.base import Store

__all__ = ["BUS_SCHEMES", "STORE_SCHEMES", "make_bus", "make_store"]

# scheme -> "module:function"; the function takes (url, settings).
BUS_SCHEMES = {"local": "meterops.bus.local:build", "kafka": "meterops.bus.kafka:build"}
STORE_SCHEMES = {
    "sqlite": "meterops.store.sqlite:build",
    "postgresql": "meterops.store.postgres:build",
    "postgres": "meterops.store.postgres:build",
}


def _builder(role: str, table: dict[str, str], url: str) -> Callable[..., object]:
    scheme = url.partition("://")[0] if "://" in url else ""
    target = table.get(scheme)
    if target is None:
        raise UnknownScheme(role, url, [f"{s}://" for s in table])
    module, _, func = target.partition(":")
    builder: Callable[..., object] = getattr(import_module(module), func)
    return builder


def make_bus(settings: Settings) -> Bus:
    """The bus named by ``settings.backends.bus`` (not yet opened)."""
    url = settings.resolve(settings.backends.bus)
    bus: Bus = _builder("bus", BUS_SCHEMES, url)(url, settings)  # type: ignore[assignment]
    return bus


def make_store(settings: Settings) -> Store:
    """The store named by ``settings.backends.store`` (not yet opened)."""
    url = settings.resolve(settings.backends.store)
    store: Store = _builder("store", STORE_SCHEMES, url)(url, settings)  # type: ignore[assignment]
    return store
