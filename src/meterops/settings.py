"""Typed settings, loaded once by an entry point and passed down.

Precedence, lowest first: built-in defaults < ``meterops.toml`` < ``METEROPS_*``
environment variables (nested keys joined by ``__``, e.g.
``METEROPS_BACKENDS__BUS=kafka://127.0.0.1:9092``) < explicit arguments.
Relative paths inside backend URLs are resolved against the directory of the
config file, so every command sees the same project whatever its working
directory. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from meterops.errors import ConfigError

__all__ = [
    "CONFIG_NAME",
    "BackendSettings",
    "BusSettings",
    "RegistrySettings",
    "Settings",
    "ValidationSettings",
    "WorkerSettings",
    "find_config",
    "load_settings",
    "parse_duration",
    "redact_url",
]

CONFIG_NAME = "meterops.toml"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|sec|min|m|h|d|w)\s*$")
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}


def parse_duration(text: str | int | float) -> pd.Timedelta:
    """Parse ``30min``, ``24h``, ``1d``, ``2w`` or a number of seconds.

    >>> parse_duration("24h") == pd.Timedelta(hours=24)
    True
    """
    if isinstance(text, int | float):
        return pd.Timedelta(seconds=float(text))
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30min, 24h, 1d, 2w)")
    amount, unit = float(match.group(1)), match.group(2)
    if unit == "d":
        return pd.Timedelta(days=amount)
    if unit == "w":
        return pd.Timedelta(weeks=amount)
    return pd.Timedelta(seconds=amount * _SECONDS[unit])


_TOML: ContextVar[dict[str, Any] | None] = ContextVar("meterops_toml", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """The parsed ``meterops.toml`` of the load in progress (set by load_settings)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_TOML.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_TOML.get() or {})


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BackendSettings(_Section):
    """Which implementation plays each role, chosen by URL scheme."""

    bus: str = "local://.meterops/bus"
    store: str = "sqlite:///.meterops/meterops.db"
    lake: str = "file://.meterops/lake"


class BusSettings(_Section):
    partitions: int = Field(4, ge=1, le=1024)
    retention: str = "7d"
    segment_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    fsync: bool = False
    replication_factor: int = Field(1, ge=1)
    # librdkafka settings passed through as given, e.g. {"security.protocol" =
    # "SASL_SSL", "sasl.mechanism" = "PLAIN", "sasl.username" = "...", ...}.
    kafka: dict[str, str] = Field(default_factory=dict)

    @field_validator("retention")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v


class ValidationSettings(_Section):
    """Rules a reading must pass to be stored; failures become dead letters."""

    value_min: float = -1e6
    value_max: float = 1e6
    covariate_min: float = -1e6
    covariate_max: float = 1e6
    max_future: str = "1d"
    min_ts: str = "1990-01-01"
    allow_missing_value: bool = True
    require_registration: bool = False

    @field_validator("max_future")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)
        return v


class WorkerSettings(_Section):
    group: str = "workers"
    # Scoring one micro-batch overlaps writing the previous one, so the first
    # and last are not overlapped: 50,000 drained 480,000 readings at 54,500/s
    # against 51,700/s with 100,000 (bench fleet, mean of three drains).
    batch_rows: int = Field(50_000, ge=1)
    poll_timeout: float = Field(0.5, gt=0)
    retry_for: float = Field(300.0, ge=0)  # keep retrying an unreachable backend this long


class ScoringSettings(_Section):
    """What the worker does with each valid reading (see :mod:`meterops.stream`).

    ``horizons`` are forecast per reading by the champion (durations or
    steps); a reading is an anomaly when it is more than ``anomaly_threshold``
    interval-widths-in-sigmas from its one-step forecast. ``reload_every`` is
    how often (seconds) the champion alias is checked; ``online`` runs the
    online model prequentially per micro-batch (one learner per partition).
    ``online_registry_every`` is how often (seconds) the learners, merged,
    are logged to the registry as an ``online`` challenger and put through
    the champion gate (``0``: never); see :mod:`meterops.online_registry`.
    ``noise_window`` is how many of a meter's latest one-step residuals set
    its own anomaly scale (``0``: the model's intervals alone); see
    :class:`meterops.stream.ResidualScale`.
    """

    enabled: bool = True
    horizons: tuple[str, ...] = ("1", "24h")
    anomaly_threshold: float = Field(4.0, gt=0)
    reload_every: float = Field(1.0, gt=0)
    online: bool = True
    online_registry_every: float = Field(3600.0, ge=0)
    noise_window: int = Field(168, ge=0)

    @field_validator("horizons")
    @classmethod
    def _horizons(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("horizons must name at least one horizon")
        for text in v:
            if not str(text).strip().isdigit():
                parse_duration(text)
        return tuple(str(t) for t in v)


class SourceSettings(_Section):
    timezone: str = "UTC"
    chunk_rows: int = Field(100_000, ge=1)


class RegistrySettings(_Section):
    """MLflow tracking and model registry (see :mod:`meterops.registry`).

    ``tracking_uri`` is a local SQLite file by default (relative to the
    project) or an MLflow tracking server URL (``http://host:5000``).
    ``artifact_root`` is where a local backend keeps model files; a server
    decides for itself.
    """

    tracking_uri: str = "sqlite:///.meterops/mlflow.db"
    artifact_root: str = ".meterops/mlartifacts"
    experiment: str = "meterops"
    model_name: str = "meterops-forecaster"
    gate_metric: str = "rmse"
    gate_margin: float = Field(0.02, ge=0, lt=1)
    folds: int = Field(3, ge=1)
    carbon_country: str = Field("FRA", min_length=3, max_length=3)

    @field_validator("gate_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in ("rmse", "mae", "smape", "mape"):
            raise ValueError(f"gate_metric must be rmse, mae, smape or mape; got {v!r}")
        return v


class Settings(BaseSettings):
    """All settings of one meterops project (see the module docstring for precedence)."""

    model_config = SettingsConfigDict(
        env_prefix="METEROPS_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    project_dir: Path = Field(default_factory=Path.cwd)
    backends: BackendSettings = BackendSettings()
    bus: BusSettings = BusSettings()
    validation: ValidationSettings = ValidationSettings()
    worker: WorkerSettings = WorkerSettings()
    scoring: ScoringSettings = ScoringSettings()
    source: SourceSettings = SourceSettings()
    registry: RegistrySettings = RegistrySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: arguments, then the environment, then the TOML file.
        return (init_settings, env_settings, _TomlSource(settings_cls))

    def resolve(self, url: str) -> str:
        """Make a relative path inside ``scheme://path`` absolute against the project."""
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "file", url
        if scheme in ("local", "file", "sqlite") and rest and not rest.startswith("/"):
            return f"{scheme}://{(self.project_dir / rest).resolve()}"
        if scheme == "sqlite" and rest.startswith("//"):
            return url  # sqlite:////abs/path
        if scheme == "sqlite" and rest.startswith("/"):
            # sqlite:///relative (SQLAlchemy style: three slashes = relative)
            return f"sqlite://{(self.project_dir / rest[1:]).resolve()}"
        return url


_PASSWORD = re.compile(r"(?<=://)([^:/@]+):[^@/]*@")
_SECRET_QUERY = re.compile(r"(?i)((?:password|secret|token)[^=&]*=)[^&]*")


def redact_url(url: str) -> str:
    """``url`` safe to print: passwords and secret query values replaced by ``***``.

    >>> redact_url("postgresql://app:s3cret@db:5432/m?sslpassword=x&sslmode=require")
    'postgresql://app:***@db:5432/m?sslpassword=***&sslmode=require'
    """
    return _SECRET_QUERY.sub(r"\1***", _PASSWORD.sub(r"\1:***@", url))


def find_config(start: Path | None = None) -> Path | None:
    """The ``meterops.toml`` in ``start`` (default: the working directory), if any."""
    candidate = (start or Path.cwd()) / CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Load the project's settings; ``config`` defaults to ``./meterops.toml`` if present.

    Raises :class:`ConfigError` naming the file and the offending key.
    """
    path = config if config is not None else find_config()
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (create one with: meterops init)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        data.setdefault("project_dir", path.parent.resolve())
    token = _TOML.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}invalid settings: {problems}") from exc
    finally:
        _TOML.reset(token)


DEFAULT_TOML = """\
# meterops project configuration.
# Precedence: defaults < this file < METEROPS_* environment variables
# (nested keys joined by "__", e.g. METEROPS_BUS__PARTITIONS=8) < command-line flags.
# Relative paths are relative to this file's directory.

[backends]
# Embedded defaults: zero setup, one machine.
bus = "local://.meterops/bus"          # or "kafka://broker1:9092,broker2:9092?prefix=prod."
store = "sqlite:///.meterops/meterops.db"  # or "postgresql://user@db-host:5432/meterops"
lake = "file://.meterops/lake"          # any fsspec URL, e.g. "s3://bucket/lake"

[bus]
partitions = 4            # readings are spread over partitions by meter id hash
retention = "7d"          # whole log segments older than this are deleted
segment_bytes = 67108864  # roll a new segment file after this many bytes
fsync = false             # true: fsync every append (survives power loss, slower)
replication_factor = 1    # Kafka: replicas of each topic created by meterops

# Kafka client settings (librdkafka names), passed through as given, e.g. for a
# secured cluster. Secrets can come from the environment instead:
# METEROPS_BUS__KAFKA='{"sasl.password": "..."}'
# [bus.kafka]
# "security.protocol" = "SASL_SSL"
# "sasl.mechanism" = "SCRAM-SHA-512"
# "sasl.username" = "meterops"
# "ssl.ca.location" = "/etc/ssl/certs/ca.pem"

[validation]
# Readings breaking a rule are dead-lettered with the reason, never dropped.
value_min = -1e6          # physical range of a reading's value
value_max = 1e6
covariate_min = -1e6      # range of numeric covariates (e.g. temperature)
covariate_max = 1e6
max_future = "1d"         # reject timestamps later than now + this
min_ts = "1990-01-01"     # reject timestamps earlier than this
allow_missing_value = true    # an empty value is a missing reading, not an error
require_registration = false  # true: readings of unregistered meters are rejected

[worker]
group = "workers"         # consumer group: workers in one group share partitions
batch_rows = 50000        # micro-batch size
poll_timeout = 0.5        # seconds to wait for new readings
retry_for = 300           # seconds to keep retrying an unreachable bus or store (backoff)

[scoring]
# The worker scores every valid reading with the registry's champion.
enabled = true
horizons = ["1", "24h"]   # forecasts per reading: steps or durations
anomaly_threshold = 4.0   # flag readings this many sigmas (from the 80 % interval) off
reload_every = 1.0        # seconds between checks of the champion alias (hot reload)
online = true             # online model learns per micro-batch (prequential metrics)
online_registry_every = 3600  # seconds between registry versions of the merged online
                              # model (then the champion gate; 0 = never log it)
noise_window = 168        # a meter's last N one-step residuals widen its anomaly scale
                          # when it is noisier than the model's intervals say (0 = off)

[source]
timezone = "UTC"          # zone of naive timestamps in input files
chunk_rows = 100000       # rows per message when publishing a file

[registry]
# MLflow tracking + model registry: a local SQLite file by default, or a
# tracking server, e.g. tracking_uri = "http://mlflow-host:5000".
tracking_uri = "sqlite:///.meterops/mlflow.db"
artifact_root = ".meterops/mlartifacts"  # model files of a local backend
experiment = "meterops"
model_name = "meterops-forecaster"
gate_metric = "rmse"      # rmse, mae, smape or mape, on the same backtest folds
gate_margin = 0.02        # a challenger must beat the champion by 2 % (relative)
folds = 3                 # rolling-origin backtest folds of a training run
carbon_country = "FRA"    # ISO 3166 alpha-3 code for the CodeCarbon offline estimate
"""
