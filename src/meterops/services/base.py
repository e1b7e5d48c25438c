"""The service interface: install once, start on loopback, stop, restart for fault tests."""

from __future__ import annotations

import socket
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

from meterops.errors import BackendError

__all__ = ["Service", "cache_dir", "free_port", "wait_for_port"]


def cache_dir() -> Path:
    """Where installed service files (e.g. Kafka jars) are kept between runs."""
    path = Path.home() / ".cache" / "meterops"
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, what: str) -> None:
    """Block until 127.0.0.1:``port`` accepts connections or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise BackendError(f"{what} did not start listening on 127.0.0.1:{port} in {timeout:.0f} s")


class Service(ABC):
    """A real server process on loopback, owned by whoever started it."""

    name: str = "service"

    @abstractmethod
    def install(self) -> None:
        """Make the binaries available (idempotent; downloads only the first time)."""

    @abstractmethod
    def start(self) -> Self:
        """Start on 127.0.0.1 and wait until it accepts clients."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server (keeps its data so ``start`` can resume); safe twice."""

    @abstractmethod
    def cleanup(self) -> None:
        """Stop and delete the data directory."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The meterops backend URL of the running service."""

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
