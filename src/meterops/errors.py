"""The one exception tree of meterops.

Every error a caller can act on is a :class:`MeterOpsError`; backends wrap
their driver's exceptions (``raise ... from exc``) so no caller ever has to
catch a dependency's type. The CLI prints ``str(error)`` on one line and exits
non-zero; the API (later) maps the classes to status codes in one place::

    MeterOpsError
    ├── ConfigError          bad meterops.toml / env / argument; names the key
    ├── BackendError         a bus, store or lake backend failed
    │   ├── Unavailable         unreachable for now (connection lost): retry later
    │   ├── MissingDependency   an optional driver is not installed (says how)
    │   └── UnknownScheme       a URL scheme nobody registered (lists valid ones)
    ├── InputError           a file or payload that cannot be read at all
    └── NotFound             a meter, dead letter or topic that does not exist
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "InputError",
    "MeterOpsError",
    "MissingDependency",
    "NotFound",
    "Unavailable",
    "UnknownScheme",
]


class MeterOpsError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(MeterOpsError):
    """Configuration that cannot be used; the message names the key."""


class BackendError(MeterOpsError):
    """A backend (bus, store, lake) failed; the driver error is chained."""


class Unavailable(BackendError):
    """A backend cannot be reached right now; the same call may succeed later.

    Workers catch it, back off (``retry_after`` seconds as a hint) and retry
    the same micro-batch, which is safe because writes are idempotent.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MissingDependency(BackendError):
    """An optional driver is missing; the message gives the install command."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(
            f"{package} is not installed; install it with: pip install 'meterops[{extra}]'"
        )
        self.package = package
        self.extra = extra


class UnknownScheme(BackendError):
    """A backend URL with a scheme no builder is registered for."""

    def __init__(self, role: str, url: str, valid: list[str]) -> None:
        super().__init__(
            f"unknown {role} URL scheme in {url!r}; valid schemes are: {', '.join(sorted(valid))}"
        )
        self.role = role
        self.url = url
        self.valid = valid


class InputError(MeterOpsError):
    """Input that cannot be read at all (as opposed to bad rows, which are dead-lettered)."""


class NotFound(MeterOpsError):
    """A named thing that does not exist."""
