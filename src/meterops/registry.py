"""MLflow tracking and model registry: log, register, gate, promote, roll back.

A training run logs its parameters, backtest metrics per horizon
(``rmse_h24`` = RMSE at 24 steps, pooled over the rolling-origin folds), the
data range, lineage (a sha256 fingerprint of the training frame plus the file
hash or the bus offsets), a CodeCarbon estimate and the model. The model
version is registered under one registered model (``meterops-forecaster``)
and gets the ``challenger`` alias; :meth:`Registry.gate` gives it the
``champion`` alias only when it beats the champion on the same backtest.

Storage format (nothing is unpickled on load): a model directory holds
``forecaster.json`` (class, hyper-parameters and learned scalars), LightGBM
boosters in LightGBM's own text format (``boosters/h{H}_{target}.txt``) and
baseline training grids as Parquet. It is wrapped as an MLflow pyfunc through
"models from code" (a ten-line ``forecaster_pyfunc.py``, no cloudpickle), with
a signature (readings in, forecast out, ``horizon`` as a parameter) and an
input example. :meth:`Registry.load` reads the directory back without pyfunc.

Gate: each run's metrics are tied to a *backtest key*, the sha256 of the data
fingerprint, the fold cuts and the settings that produce them. Logged metrics
are compared only when both keys and the point counts are equal; otherwise
the gate needs the data and re-runs both recipes (model class + parameters)
through :func:`meterops.backtest.run_backtest` on the same folds, verifies the
cuts match and scores both on the points where both have a forecast.

Audit: every promotion and rollback is a JSON record kept as a tag
``audit.<utc time>`` of the registered model, so it lives (and travels) with
the registry itself, local file or tracking server. :meth:`Registry.audit`
lists them; rollback replays them as a stack of champions.

>>> Emissions(kg_co2eq=0.001, energy_kwh=0.01, duration_s=2.0).kg_co2eq
0.001
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd

from meterops.errors import BackendError, ConfigError, InputError, NotFound, Unavailable
from meterops.models.base import Forecaster, prepare_frame

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from meterops.settings import Settings

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_MODEL_NAME",
    "AuditRecord",
    "BacktestInfo",
    "CarbonTracker",
    "Emissions",
    "GateResult",
    "ModelVersion",
    "Registry",
    "backtest_forecaster",
    "data_fingerprint",
    "file_sha256",
    "input_example",
    "load_forecaster",
    "save_forecaster",
    "tracking_uri_for",
]

DEFAULT_MODEL_NAME = "meterops-forecaster"
CHAMPION = "champion"
CHALLENGER = "challenger"
GATE_METRICS = ("rmse", "mae", "smape", "mape")
_FORMAT = "meterops-forecaster/1"
_TAG = "meterops."
_AUDIT = "audit."

_PYFUNC_CODE = '''"""A meterops forecaster as an MLflow pyfunc (models from code: no pickle)."""

from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model


class MeterOpsForecaster(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from meterops.registry import load_forecaster

        self.model = load_forecaster(context.artifacts["forecaster"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return self.model.forecast(model_input, (params or {}).get("horizon", "1"))


set_model(MeterOpsForecaster())
'''


# ---------------------------------------------------------------------- lazy imports


def _mlflow() -> Any:
    """Import mlflow with telemetry and progress bars off (never at meterops import time)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        import mlflow
    except ImportError as exc:  # pragma: no cover - mlflow is a core dependency
        raise BackendError("mlflow is not installed; install it with: pip install mlflow") from exc
    return mlflow


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the dependency warnings mlflow, SQLAlchemy and CodeCarbon emit on every call."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", module=r"(mlflow|sqlalchemy|alembic|codecarbon)(\.|$)")
        warnings.filterwarnings("ignore", message=r".*(integer column|type hints).*")
        yield


# ---------------------------------------------------------------------- records


@dataclass(frozen=True)
class Emissions:
    """A CodeCarbon estimate of one training job."""

    kg_co2eq: float
    energy_kwh: float
    duration_s: float
    country: str = ""
    method: str = "codecarbon-offline"


@dataclass(frozen=True)
class BacktestInfo:
    """How the metrics of a run were obtained; equal ``key`` = same data and same folds."""

    fingerprint: str
    folds: int
    test_fraction: float
    seed: int
    horizons: tuple[int, ...]
    cuts: tuple[tuple[str, str], ...]
    points: Mapping[int, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        body = {
            "fingerprint": self.fingerprint,
            "folds": self.folds,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "cuts": [list(c) for c in self.cuts],
        }
        text = json.dumps(body, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: aliases, metrics of its run, lineage and gate verdict."""

    version: int
    aliases: tuple[str, ...]
    created: str
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AuditRecord:
    """One promotion or rollback: when, from which champion to which, why, with what numbers."""

    at: str
    action: str
    from_version: int | None
    to_version: int
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    user: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GateResult:
    """The verdict of :meth:`Registry.gate`; ``per_horizon`` holds both scores per horizon."""

    challenger: int
    champion: int | None
    promoted: bool
    metric: str
    margin: float
    evidence: str
    per_horizon: dict[str, dict[str, float]]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- lineage


def data_fingerprint(frame: pd.DataFrame) -> str:
    """``sha256:...`` of a reading frame, independent of row order and column order.

    >>> f = pd.DataFrame({"meter_id": ["a", "b"], "ts": ["2024-01-01", "2024-01-01"],
    ...                   "value": [1.0, 2.0]})
    >>> data_fingerprint(f) == data_fingerprint(f.iloc[::-1])
    True
    """
    df = prepare_frame(frame)
    covs = sorted(c for c in df.columns if c not in ("meter_id", "ts", "value", "label"))
    covs = [c for c in covs if not str(c).startswith("_")]
    df = df.sort_values(["meter_id", "ts"], kind="stable")
    digest = hashlib.sha256()
    digest.update("\0".join(df["meter_id"].tolist()).encode())
    ns = df["ts"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")
    digest.update(ns.view(np.int64).astype("<i8").tobytes())
    for name in ["value", *covs]:
        digest.update(b"\0" + str(name).encode() + b"\0")
        values = pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        digest.update(values.astype("<f8").tobytes())
    return "sha256:" + digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """``sha256:...`` of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def input_example(frame: pd.DataFrame, rows: int = 48) -> pd.DataFrame:
    """The last ``rows`` readings of the first meter, ``ts`` as naive UTC (what MLflow stores)."""
    df = prepare_frame(frame)
    first = sorted(df["meter_id"].unique())[0]
    part = df[df["meter_id"] == first].sort_values("ts").tail(rows)
    part = part[[c for c in part.columns if c != "label" and not str(c).startswith("_")]]
    part["ts"] = part["ts"].dt.tz_convert("UTC").dt.tz_localize(None)
    out: pd.DataFrame = part.reset_index(drop=True)
    return out


class CarbonTracker:
    """CodeCarbon's offline tracker around a block; never touches the network.

    ``with CarbonTracker("FRA") as carbon: model.fit(frame)`` then
    ``carbon.emissions``. If CodeCarbon cannot measure on this machine the
    estimate is zero with ``method="unavailable"`` rather than failing the run.
    """

    def __init__(self, country_iso_code: str = "FRA") -> None:
        self.country_iso_code = country_iso_code
        self.emissions = Emissions(0.0, 0.0, 0.0, country_iso_code, "unavailable")
        self._tracker: Any = None
        self._started = 0.0

    def __enter__(self) -> Self:
        import logging

        os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self._started = time.perf_counter()
        try:
            with _quiet():
                from codecarbon import OfflineEmissionsTracker

                self._tracker = OfflineEmissionsTracker(
                    country_iso_code=self.country_iso_code,
                    output_methods=[],
                    log_level="error",
                    measure_power_secs=15,
                    allow_multiple_runs=True,
                )
                self._tracker.start()
        except Exception:  # an estimate must never fail a training run
            self._tracker = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        duration = time.perf_counter() - self._started
        if self._tracker is None:
            self.emissions = Emissions(0.0, 0.0, duration, self.country_iso_code, "unavailable")
            return
        try:
            with _quiet():
                kg = self._tracker.stop()
                data = self._tracker.final_emissions_data
            self.emissions = Emissions(
                kg_co2eq=float(kg or 0.0),
                energy_kwh=float(getattr(data, "energy_consumed", 0.0) or 0.0),
                duration_s=duration,
                country=self.country_iso_code,
            )
        except Exception:  # same: never fail the run
            self.emissions = Emissions(0.0, 0.0, duration, self.country_iso_code, "unavailable")


# ---------------------------------------------------------------------- model files


def _recipe(model: Forecaster) -> tuple[str, dict[str, Any]]:
    """The report name and the JSON-able hyper-parameters of ``model``."""
    from meterops.models.baselines import Persistence, SeasonalNaive
    from meterops.models.gbm import GBMForecaster
    from meterops.models.online import OnlineForecaster

    params = model.get_params()
    if params.get("features") is not None:
        params["features"] = dataclasses.asdict(params["features"])
    if "horizons" in params:
        params["horizons"] = list(params["horizons"])
    if isinstance(model, GBMForecaster):
        return "gbm", params
    if isinstance(model, Persistence):
        return "persistence", params
    if isinstance(model, SeasonalNaive):
        return str(model.model_name), params
    if isinstance(model, OnlineForecaster):
        # one horizon, named as every recipe names them (backtests read ``horizons``)
        params["horizons"] = [params.pop("horizon")]
        return "online", params
    raise ConfigError(
        f"{type(model).__name__} cannot be stored in the registry;"
        " supported: GBMForecaster, Persistence, SeasonalNaive, OnlineForecaster"
    )


def _build(name: str, params: dict[str, Any]) -> Forecaster:
    from meterops.features import FeatureSpec
    from meterops.models.baselines import Persistence, SeasonalNaive
    from meterops.models.gbm import GBMForecaster
    from meterops.models.online import OnlineForecaster

    kwargs = dict(params)
    if kwargs.get("features") is not None:
        kwargs["features"] = FeatureSpec(**kwargs["features"])
    if "horizons" in kwargs:
        kwargs["horizons"] = tuple(kwargs["horizons"])
    if name == "gbm":
        return GBMForecaster(**kwargs)
    if name == "online":
        horizons = kwargs.pop("horizons", None) or (1,)
        if len(horizons) != 1:
            raise ConfigError(f"an online model has one horizon; stored {list(horizons)}")
        return OnlineForecaster(horizon=horizons[0], **kwargs)
    if name == "persistence":
        return Persistence(**kwargs)
    if name.startswith("seasonal_naive"):
        return SeasonalNaive(**kwargs)
    raise ConfigError(f"unknown stored model {name!r}")


def _ts(value: Any) -> str:
    return pd.Timestamp(value).isoformat()


def _save_naive(model: Any, directory: Path, prefix: str) -> dict[str, Any]:
    model.train_.to_parquet(directory / f"{prefix}train.parquet", index=False)
    return {
        "freq_ns": int(model.freq_.value),
        "origin": _ts(model.origin_),
        "residual_steps": int(model.residual_steps_),
    }


def _load_naive(model: Any, directory: Path, prefix: str, state: dict[str, Any]) -> None:
    model.freq_ = pd.Timedelta(state["freq_ns"], unit="ns")
    model.origin_ = pd.Timestamp(state["origin"])
    model.covariates_ = ()
    model.train_ = pd.read_parquet(directory / f"{prefix}train.parquet")
    model.residual_steps_ = int(state["residual_steps"])
    model._residuals = {}


def save_forecaster(model: Forecaster, directory: str | os.PathLike[str]) -> Path:
    """Write a fitted model to ``directory`` (JSON + LightGBM text + Parquet; no pickle).

    An online model is its :meth:`~meterops.models.online.OnlineForecaster.state_dict`
    with the feature buffers: NumPy arrays in ``online_state.npz``, the rest in
    ``forecaster.json``; it resumes learning exactly where it stopped.

    Raises :class:`ConfigError` for a model class the registry cannot store
    and :class:`NotFound` for an unfitted model.
    """
    from meterops.models.gbm import GBMForecaster
    from meterops.models.online import OnlineForecaster

    model._check_fitted()
    name, params = _recipe(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any]
    if isinstance(model, OnlineForecaster):
        # learned sums and feature buffers: arrays in .npz, the rest in the JSON document
        full = model.state_dict(buffers=True)
        arrays = {k: v for k, v in full.items() if isinstance(v, np.ndarray)}
        np.savez(out / "online_state.npz", **arrays)  # type: ignore[arg-type]
        state = {k: v for k, v in full.items() if not isinstance(v, np.ndarray)}
        state["arrays"] = "online_state.npz"
    elif isinstance(model, GBMForecaster):
        (out / "boosters").mkdir(exist_ok=True)
        boosters: dict[str, dict[str, str]] = {}
        for h, by_target in model.boosters_.items():
            for target, booster in by_target.items():
                rel = f"boosters/h{h}_{target}.txt"
                (out / rel).write_text(booster.model_to_string(), encoding="utf-8")
                boosters.setdefault(str(h), {})[target] = rel
        stats = model.stats_
        state = {
            "freq_ns": int(model.freq_.value),
            "origin": _ts(model.origin_),
            "covariates": list(model.covariates_),
            "spec": dataclasses.asdict(model.spec_),
            "steps": [int(s) for s in model.steps_],
            "stats": {
                "meter_id": [str(m) for m in stats.index],
                "loc": [float(v) for v in stats["loc"]],
                "scale": [float(v) for v in stats["scale"]],
            },
            "boosters": boosters,
            "shifts": {str(h): s for h, s in model.shifts_.items()},
            "calibration_start": {str(h): _ts(t) for h, t in model.calibration_start_.items()},
            "fallback": {
                "name": _recipe(model.fallback_)[0],
                "params": _recipe(model.fallback_)[1],
                "state": _save_naive(model.fallback_, out, "fallback_"),
            },
        }
    else:
        state = _save_naive(model, out, "")
    document = {"format": _FORMAT, "model": name, "params": params, "state": state}
    (out / "forecaster.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    return out


def load_forecaster(directory: str | os.PathLike[str]) -> Forecaster:
    """Read a model written by :func:`save_forecaster`; it forecasts the same numbers.

    Raises :class:`InputError` when the directory does not hold a meterops model.
    """
    import lightgbm as lgb

    from meterops.features import FeatureSpec

    root = Path(directory)
    try:
        document = json.loads((root / "forecaster.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{root} does not hold a meterops model: {exc}") from exc
    if document.get("format") != _FORMAT:
        raise InputError(f"{root}: unsupported model format {document.get('format')!r}")
    model = _build(document["model"], document["params"])
    state = document["state"]
    if document["model"] == "online":
        from meterops.models.online import OnlineForecaster

        full = {k: v for k, v in state.items() if k != "arrays"}
        try:
            with np.load(root / str(state["arrays"]), allow_pickle=False) as npz:
                full.update({key: npz[key] for key in npz.files})
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{root}: unreadable online model arrays: {exc}") from exc
        return OnlineForecaster.from_state(full)
    if document["model"] != "gbm":
        _load_naive(model, root, "", state)
        return model
    m: Any = model
    m.freq_ = pd.Timedelta(state["freq_ns"], unit="ns")
    m.origin_ = pd.Timestamp(state["origin"])
    m.covariates_ = tuple(state["covariates"])
    m.spec_ = FeatureSpec(**state["spec"])
    m.steps_ = [int(s) for s in state["steps"]]
    stats = pd.DataFrame(
        {"loc": state["stats"]["loc"], "scale": state["stats"]["scale"]},
        index=pd.Index(state["stats"]["meter_id"], name="meter_id"),
        dtype=np.float64,
    )
    m.stats_ = stats
    m.plans_ = {h: m.spec_.plan(m.freq_, h, m.covariates_) for h in m.steps_}
    m.boosters_ = {
        int(h): {
            t: lgb.Booster(model_str=(root / rel).read_text(encoding="utf-8"))
            for t, rel in by_target.items()
        }
        for h, by_target in state["boosters"].items()
    }
    m.shifts_ = {int(h): {t: float(v) for t, v in s.items()} for h, s in state["shifts"].items()}
    m.validation_ = {}
    m.calibration_start_ = {int(h): pd.Timestamp(t) for h, t in state["calibration_start"].items()}
    fb = state["fallback"]
    m.fallback_ = _build(fb["name"], fb["params"])
    _load_naive(m.fallback_, root, "fallback_", fb["state"])
    return model


# ---------------------------------------------------------------------- backtests


def _horizon_steps(model: Forecaster, frame: pd.DataFrame, horizons: Sequence[int | str]) -> Any:
    from meterops.features import FeatureSpec, resolve_horizon

    spec = getattr(model, "features", None) or FeatureSpec()
    freq = spec.resolve_freq(prepare_frame(frame))
    return [(h, resolve_horizon(h, freq)) for h in horizons]


def _recipe_backtest(
    frame: pd.DataFrame,
    name: str,
    params: dict[str, Any],
    horizons: Sequence[int],
    folds: int,
    test_fraction: float,
    seed: int,
) -> tuple[dict[int, pd.DataFrame], tuple[tuple[str, str], ...], dict[int, dict[str, Any]]]:
    """Predictions, fold cuts and pooled metrics of one recipe per horizon (steps)."""
    from meterops.backtest import run_backtest
    from meterops.features import FeatureSpec

    spec_dict = params.get("features")
    spec = FeatureSpec(**spec_dict) if spec_dict else None
    extra = {k: v for k, v in params.items() if k not in ("horizons", "features", "seed")}
    if name != "gbm":
        extra = {}
    preds: dict[int, pd.DataFrame] = {}
    docs: dict[int, dict[str, Any]] = {}
    cuts: list[tuple[str, str]] = []
    for h in horizons:
        document, pred = run_backtest(
            frame,
            h,
            folds=folds,
            models=[name],
            features=spec,
            test_fraction=test_fraction,
            seed=seed,
            gbm_params=extra,
        )
        preds[h] = pred[pred["model"] == name]
        docs[h] = document["models"][name]
        cuts.extend((f"h{h}:{f['origin']}", f["end"]) for f in document["folds"])
    return preds, tuple(cuts), docs


def backtest_forecaster(
    frame: pd.DataFrame,
    model: Forecaster,
    horizons: Sequence[int | str] | None = None,
    folds: int = 3,
    test_fraction: float = 0.3,
) -> tuple[dict[int, dict[str, Any]], BacktestInfo]:
    """Rolling-origin backtest of ``model``'s recipe per horizon (steps -> pooled metrics).

    The model itself is not fitted; its class and hyper-parameters are
    re-trained on each fold exactly as :func:`meterops.backtest.run_backtest`
    does. ``horizons`` defaults to the model's own.
    """
    name, params = _recipe(model)
    seed = int(params.get("seed", 0))
    wanted = horizons if horizons is not None else params.get("horizons", (1,))
    steps = [s for _, s in _horizon_steps(model, frame, wanted)]
    _, cuts, docs = _recipe_backtest(frame, name, params, steps, folds, test_fraction, seed)
    info = BacktestInfo(
        fingerprint=data_fingerprint(frame),
        folds=folds,
        test_fraction=test_fraction,
        seed=seed,
        horizons=tuple(steps),
        cuts=cuts,
        points={h: int(docs[h]["n"]) for h in steps},
    )
    return docs, info


# ---------------------------------------------------------------------- registry


def tracking_uri_for(settings: Settings) -> tuple[str, str | None]:
    """The absolute tracking URI and local artifact root of a project's settings."""
    uri = settings.registry.tracking_uri
    root: str | None = None
    scheme, sep, rest = uri.partition("://")
    if scheme == "sqlite" and sep:
        path = rest[1:] if rest.startswith("/") else rest
        if not path.startswith("/"):
            path = str((settings.project_dir / path).resolve())
        uri = f"sqlite:///{path}"
        root = str((settings.project_dir / settings.registry.artifact_root).resolve())
    elif not sep:  # a bare directory: MLflow's file store
        root = None
        uri = str((settings.project_dir / uri).resolve())
    return uri, root


def _now() -> str:
    return pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _user() -> str:
    for name in ("METEROPS_USER", "USER", "USERNAME"):
        if os.environ.get(name):
            return os.environ[name]
    return ""


class Registry:
    """The MLflow tracking server / model registry of one project, opened explicitly.

    ``Registry(tracking_uri).open()`` (or ``with Registry(uri) as reg``)
    connects, creates the experiment and the registered model when missing.
    No global MLflow state is touched: every call goes through one
    ``MlflowClient(tracking_uri=...)``. Errors of the server are raised as
    :class:`~meterops.errors.BackendError` (:class:`Unavailable` when it
    cannot be reached); unknown versions as :class:`NotFound`.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        artifact_root: str | os.PathLike[str] | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        experiment: str = "meterops",
    ) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = None if artifact_root is None else str(artifact_root)
        self.model_name = model_name
        self.experiment = experiment
        self._client: MlflowClient | None = None
        self._experiment_id = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        uri, root = tracking_uri_for(settings)
        reg = settings.registry
        return cls(uri, artifact_root=root, model_name=reg.model_name, experiment=reg.experiment)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> Self:
        mlflow = _mlflow()
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        with self._calls("open the registry"):
            client = mlflow.MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if self.artifact_root is not None:
                    Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
                    location = Path(self.artifact_root).resolve().as_uri()
                self._experiment_id = client.create_experiment(
                    self.experiment, artifact_location=location
                )
            else:
                self._experiment_id = exp.experiment_id
            try:
                client.get_registered_model(self.model_name)
            except mlflow.exceptions.MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                client.create_registered_model(
                    self.model_name, description="meterops forecaster (champion / challenger)"
                )
        self._client = client
        return self

    def close(self) -> None:
        self._client = None

    def __enter__(self) -> Self:
        return self.open() if self._client is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            raise BackendError("the registry is not open; call Registry(...).open() first")
        return self._client

    @contextlib.contextmanager
    def _calls(self, what: str) -> Iterator[None]:
        """Translate MLflow / driver errors into meterops errors; silence their warnings."""
        mlflow = _mlflow()
        try:
            with _quiet():
                yield
        except mlflow.exceptions.MlflowException as exc:
            text = " ".join(str(exc.message).split())[:300]
            missing = exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in text.lower()
            if missing:
                raise NotFound(f"cannot {what}: {text}") from exc
            if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
                raise Unavailable(f"cannot {what}: {text}") from exc
            raise BackendError(f"cannot {what} at {self.tracking_uri}: {text}") from exc
        except (ConnectionError, OSError) as exc:
            raise Unavailable(f"cannot {what} at {self.tracking_uri}: {exc}") from exc

    # ------------------------------------------------------------------ logging

    def log_training_run(
        self,
        model: Forecaster,
        params: Mapping[str, Any],
        metrics_per_horizon: Mapping[int, Mapping[str, Any]],
        data_range: Mapping[str, Any],
        fingerprint: str,
        emissions: Emissions,
        input_example: pd.DataFrame,
        *,
        backtest: BacktestInfo | None = None,
        lineage: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> int:
        """Log one training run, register its model and give it the ``challenger`` alias.

        ``params`` are extra run parameters (the model's own hyper-parameters
        are always logged); ``metrics_per_horizon`` maps horizon steps to a
        metrics dict (``rmse``, ``mae``, ...; ``None`` values skipped);
        ``data_range`` holds ``start``, ``end``, ``rows``, ``meters``;
        ``backtest`` ties the metrics to their data and folds (without it the
        gate must re-run the backtest); ``tags`` are extra tags
        ``meterops.<key>`` of the run and the version (the ones above win;
        :meth:`latest` finds versions by them). Returns the new version number.
        """
        mlflow = _mlflow()
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.models import infer_signature

        name, recipe = _recipe(model)
        horizon = str(recipe.get("horizons", [1])[0])
        example = input_example.reset_index(drop=True)
        with _quiet():
            output = model.forecast(example, horizon)
        output["ts"] = output["ts"].dt.tz_convert("UTC").dt.tz_localize(None)
        output["step"] = output["step"].astype(np.float64)
        stamp = int(time.time() * 1000)
        flat = {f"model.{k}": v for k, v in recipe.items()} | dict(params)
        run_params = [
            Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flat.items()
        ]
        run_metrics = [
            Metric(f"{metric}_h{h}", float(value), stamp, 0)
            for h, values in metrics_per_horizon.items()
            for metric, value in values.items()
            if isinstance(value, int | float) and value is not None and np.isfinite(value)
        ]
        run_metrics += [
            Metric("emissions_kg_co2eq", float(emissions.kg_co2eq), stamp, 0),
            Metric("energy_kwh", float(emissions.energy_kwh), stamp, 0),
            Metric("train_seconds", float(emissions.duration_s), stamp, 0),
        ]
        extra = {f"{_TAG}{k}": str(v) for k, v in (tags or {}).items()}
        tags = extra | {
            f"{_TAG}model": name,
            f"{_TAG}recipe": json.dumps({"model": name, "params": recipe}),
            f"{_TAG}fingerprint": fingerprint,
            f"{_TAG}data_start": str(data_range.get("start", "")),
            f"{_TAG}data_end": str(data_range.get("end", "")),
            f"{_TAG}data_rows": str(data_range.get("rows", "")),
            f"{_TAG}data_meters": str(data_range.get("meters", "")),
            f"{_TAG}lineage": json.dumps(dict(lineage or {}), default=str)[:4000],
            f"{_TAG}emissions": json.dumps(dataclasses.asdict(emissions)),
            f"{_TAG}horizons": json.dumps(list(metrics_per_horizon)),
        }
        if backtest is not None:
            tags[f"{_TAG}backtest_key"] = backtest.key
            tags[f"{_TAG}backtest"] = json.dumps(
                {
                    "folds": backtest.folds,
                    "test_fraction": backtest.test_fraction,
                    "seed": backtest.seed,
                    "horizons": list(backtest.horizons),
                    "points": {str(k): v for k, v in backtest.points.items()},
                    "cuts": [list(c) for c in backtest.cuts],
                }
            )[:4000]
        client = self.client
        with self._calls("log the training run"):
            signature = infer_signature(example, output, params={"horizon": horizon})
            run = client.create_run(self._experiment_id, run_name=f"train-{name}")
            run_id = run.info.run_id
            client.log_batch(
                run_id,
                metrics=run_metrics,
                params=run_params,
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            with tempfile.TemporaryDirectory(prefix="meterops-model-") as tmp:
                files = Path(tmp) / "forecaster"
                save_forecaster(model, files)
                code = Path(tmp) / "forecaster_pyfunc.py"
                code.write_text(_PYFUNC_CODE, encoding="utf-8")
                packaged = Path(tmp) / "model"
                mlflow.pyfunc.save_model(
                    str(packaged),
                    python_model=str(code),
                    artifacts={"forecaster": str(files)},
                    signature=signature,
                    input_example=(example, {"horizon": horizon}),
                    pip_requirements=self._requirements(),
                )
                client.log_artifacts(run_id, str(packaged), "model")
            client.set_terminated(run_id)
            source = f"{run.info.artifact_uri}/model"
            mv = client.create_model_version(
                self.model_name, source=source, run_id=run_id, tags=extra | {f"{_TAG}model": name}
            )
            version = int(mv.version)
            client.set_registered_model_alias(self.model_name, CHALLENGER, str(version))
        return version

    @staticmethod
    def _requirements() -> list[str]:
        from importlib.metadata import PackageNotFoundError, version

        out = []
        for package in ("meterops", "mlflow", "lightgbm", "pandas", "pyarrow"):
            try:
                out.append(f"{package}=={version(package)}")
            except PackageNotFoundError:
                out.append(package)
        return out

    # ------------------------------------------------------------------ reading

    def _version(self, alias_or_version: str | int) -> Any:
        text = str(alias_or_version).strip().removeprefix("v")
        with self._calls(f"find model version {alias_or_version!r}"):
            if text.isdigit():
                return self.client.get_model_version(self.model_name, text)
            return self.client.get_model_version_by_alias(self.model_name, text)

    def _alias_version(self, alias: str) -> int | None:
        try:
            return int(self._version(alias).version)
        except NotFound:
            return None

    def champion(self) -> int | None:
        """The champion's version number, or None before the first promotion."""
        return self._alias_version(CHAMPION)

    def list(self) -> list[ModelVersion]:
        """Every version, newest first, with aliases, run metrics, tags and created time."""
        with self._calls("list model versions"):
            named = self.client.get_registered_model(self.model_name).aliases
            aliases: dict[int, builtins.list[str]] = {}
            for alias, number in named.items():
                aliases.setdefault(int(number), []).append(alias)
            found = self.client.search_model_versions(
                f"name='{self.model_name}'", max_results=10_000
            )
            out = []
            for mv in found:
                run = self.client.get_run(mv.run_id) if mv.run_id else None
                created = pd.Timestamp(int(mv.creation_timestamp), unit="ms", tz="UTC")
                out.append(
                    ModelVersion(
                        version=int(mv.version),
                        aliases=tuple(sorted(aliases.get(int(mv.version), []))),
                        created=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        run_id=str(mv.run_id or ""),
                        metrics=dict(run.data.metrics) if run else {},
                        tags={
                            k.removeprefix(_TAG): v
                            for k, v in ({**(run.data.tags if run else {}), **mv.tags}).items()
                            if k.startswith(_TAG) and k != f"{_TAG}recipe"
                        },
                    )
                )
        return sorted(out, key=lambda v: -v.version)

    def latest(self, model: str, tags: Mapping[str, str] | None = None) -> ModelVersion | None:
        """The newest version of family ``model`` whose tags ``meterops.<key>`` equal ``tags``.

        Reads versions newest first and stops at the first match (the filter
        on ``tags`` is applied here, so any value is safe to match on).
        ``metrics`` and ``aliases`` of the result are not filled in.
        """
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", model):
            raise ConfigError(f"not a model family name: {model!r}")
        wanted = {f"{_TAG}{k}": str(v) for k, v in (tags or {}).items()}
        query = f"name = '{self.model_name}' AND tags.`{_TAG}model` = '{model}'"
        token: str | None = None
        with self._calls(f"search {model} model versions"):
            while True:
                page = self.client.search_model_versions(
                    query, max_results=100, order_by=["version_number DESC"], page_token=token
                )
                for mv in page:
                    if all(mv.tags.get(k) == v for k, v in wanted.items()):
                        created = pd.Timestamp(int(mv.creation_timestamp), unit="ms", tz="UTC")
                        return ModelVersion(
                            version=int(mv.version),
                            aliases=(),
                            created=created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            run_id=str(mv.run_id or ""),
                            metrics={},
                            tags={
                                k.removeprefix(_TAG): v
                                for k, v in mv.tags.items()
                                if k.startswith(_TAG)
                            },
                        )
                token = page.token
                if not token:
                    return None

    def load(self, alias_or_version: str | int = CHAMPION) -> Forecaster:
        """The model of a version number (``3``, ``"v3"``) or alias (``"champion"``).

        Raises :class:`NotFound` when there is no such version or alias.
        """
        mv = self._version(alias_or_version)
        with (
            self._calls(f"download model version {mv.version}"),
            tempfile.TemporaryDirectory(prefix="meterops-load-") as tmp,
        ):
            path = self.client.download_artifacts(mv.run_id, "model/artifacts/forecaster", tmp)
            return load_forecaster(path)

    # ------------------------------------------------------------------ audit

    def audit(self) -> builtins.list[AuditRecord]:
        """Every promotion and rollback, oldest first."""
        with self._calls("read the audit trail"):
            tags = self.client.get_registered_model(self.model_name).tags
        records = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(_AUDIT)]
        return [AuditRecord(**r) for r in records]

    def _record(self, record: AuditRecord) -> None:
        key = f"{_AUDIT}{record.at}"
        with self._calls("write the audit trail"):
            self.client.set_registered_model_tag(self.model_name, key, json.dumps(record.to_dict()))

    def _champions(self) -> builtins.list[int]:
        """The champion stack replayed from the audit trail (last = current)."""
        stack: builtins.list[int] = []
        for r in self.audit():
            if r.action == "rollback" and stack:
                stack.pop()
            elif r.action != "rollback":
                stack.append(r.to_version)
        return stack

    def promote(
        self, version: int | str, reason: str, *, metrics: Mapping[str, Any] | None = None
    ) -> AuditRecord:
        """Make ``version`` the champion (one call), with an audit record saying why.

        Raises :class:`NotFound` for an unknown version and
        :class:`ConfigError` when ``reason`` is empty or the version already is champion.
        """
        if not reason.strip():
            raise ConfigError("a promotion needs a reason (--reason TEXT)")
        target = int(self._version(version).version)
        current = self.champion()
        if current == target:
            raise ConfigError(f"version {target} already is the champion")
        return self._move(target, current, "promote", reason, metrics)

    def rollback(self, reason: str) -> AuditRecord:
        """Give the champion alias back to the previous champion (audited).

        Raises :class:`NotFound` when there is no previous champion.
        """
        if not reason.strip():
            raise ConfigError("a rollback needs a reason (--reason TEXT)")
        stack = self._champions()
        current = self.champion()
        if current is None or len(stack) < 2:
            raise NotFound(
                f"no previous champion to roll back to in {self.model_name}"
                + (f" (champion is version {current})" if current is not None else "")
            )
        return self._move(stack[-2], current, "rollback", reason, None)

    def _move(
        self,
        target: int,
        current: int | None,
        action: str,
        reason: str,
        metrics: Mapping[str, Any] | None,
    ) -> AuditRecord:
        if metrics is None:
            with self._calls("read run metrics"):
                mv = self.client.get_model_version(self.model_name, str(target))
                metrics = dict(self.client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
        record = AuditRecord(
            at=_now(),
            action=action,
            from_version=current,
            to_version=target,
            reason=" ".join(reason.split()),
            metrics=dict(metrics),
            user=_user(),
        )
        # The audit record is written first: a champion never moves unrecorded.
        self._record(record)
        with self._calls(f"{action} version {target}"):
            self.client.set_registered_model_alias(self.model_name, CHAMPION, str(target))
            if self._alias_version(CHALLENGER) == target:
                self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
            self.client.set_model_version_tag(
                self.model_name, str(target), f"{_TAG}status", CHAMPION
            )
            if current is not None:
                status = "retired" if action == "promote" else "rolled-back"
                self.client.set_model_version_tag(
                    self.model_name, str(current), f"{_TAG}status", status
                )
        return record

    # ------------------------------------------------------------------ gate

    def _run_info(
        self, version: int
    ) -> tuple[str, dict[str, Any], dict[str, str], dict[str, float]]:
        mv = self._version(version)
        with self._calls(f"read the run of version {version}"):
            run = self.client.get_run(mv.run_id)
        tags = dict(run.data.tags)
        recipe = json.loads(tags.get(f"{_TAG}recipe", "{}"))
        if not recipe:
            raise InputError(f"version {version} was not logged by meterops (no recipe tag)")
        return recipe["model"], recipe["params"], tags, dict(run.data.metrics)

    def gate(
        self,
        challenger_version: int | str,
        metric: str = "rmse",
        margin: float = 0.02,
        *,
        data: pd.DataFrame | None = None,
    ) -> GateResult:
        """Promote the challenger only if it beats the champion on the same backtest.

        Promotion needs ``challenger <= champion * (1 - margin)`` on every
        horizon of the challenger. With no champion yet the challenger becomes
        champion. Logged metrics are used when both runs share the backtest key
        (same data fingerprint, folds and cuts) and point counts; otherwise both
        recipes are re-run on ``data`` with the same folds and scored on the
        same points. Raises :class:`InputError` when the runs are not
        comparable and ``data`` is not given, :class:`ConfigError` for a bad
        metric or margin.
        """
        if metric not in GATE_METRICS:
            raise ConfigError(
                f"gate metric must be one of {', '.join(GATE_METRICS)}; got {metric!r}"
            )
        if not 0 <= margin < 1:
            raise ConfigError(f"gate margin must be in [0, 1); got {margin}")
        version = int(self._version(challenger_version).version)
        champion = self.champion()
        if champion is None:
            record = self.promote(version, "gate: first model, no champion yet")
            return GateResult(version, None, True, metric, margin, "none", {}, record.reason)
        if champion == version:
            raise ConfigError(f"version {version} already is the champion")
        c_name, c_params, c_tags, c_metrics = self._run_info(version)
        p_name, p_params, p_tags, p_metrics = self._run_info(champion)
        horizons = [int(h) for h in json.loads(c_tags.get(f"{_TAG}horizons", "[]"))]
        key = c_tags.get(f"{_TAG}backtest_key")
        same = key is not None and key == p_tags.get(f"{_TAG}backtest_key")
        per_horizon: dict[str, dict[str, float]] = {}
        if same and all(
            f"{metric}_h{h}" in p_metrics and c_metrics.get(f"n_h{h}") == p_metrics.get(f"n_h{h}")
            for h in horizons
        ):
            evidence = f"logged metrics on the same backtest ({key})"
            for h in horizons:
                per_horizon[f"h{h}"] = {
                    "challenger": c_metrics[f"{metric}_h{h}"],
                    "champion": p_metrics[f"{metric}_h{h}"],
                }
        elif data is not None:
            evidence, per_horizon = self._rerun(
                data, (c_name, c_params), (p_name, p_params), c_tags, horizons, metric
            )
        else:
            raise InputError(
                f"champion v{champion} and challenger v{version} were backtested on different"
                " data or folds; pass the data (e.g. meterops train DATA) to re-run both on the"
                " same folds"
            )
        better = all(
            s["challenger"] <= s["champion"] * (1 - margin) for s in per_horizon.values()
        ) and bool(per_horizon)
        summary = ", ".join(
            f"{h}: {s['challenger']:.4g} vs {s['champion']:.4g}" for h, s in per_horizon.items()
        )
        verdict = "beats" if better else "does not beat"
        reason = (
            f"gate: v{version} {verdict} champion v{champion} by {margin:.0%} on {metric}"
            f" ({summary})"
        )
        with self._calls("tag the gate verdict"):
            self.client.set_model_version_tag(
                self.model_name, str(version), f"{_TAG}gate", reason[:4000]
            )
            if not better:
                self.client.set_model_version_tag(
                    self.model_name, str(version), f"{_TAG}status", "rejected"
                )
        if better:
            metrics = {"metric": metric, "margin": margin, "per_horizon": per_horizon}
            self.promote(version, reason, metrics=metrics)
        return GateResult(version, champion, better, metric, margin, evidence, per_horizon, reason)

    def _rerun(
        self,
        data: pd.DataFrame,
        challenger: tuple[str, dict[str, Any]],
        champion: tuple[str, dict[str, Any]],
        c_tags: dict[str, str],
        horizons: Sequence[int],
        metric: str,
    ) -> tuple[str, dict[str, dict[str, float]]]:
        """Both recipes on the same folds of ``data``, scored on the points both forecast."""
        from meterops.backtest import metrics as score

        setup = json.loads(c_tags.get(f"{_TAG}backtest", "{}"))
        folds = int(setup.get("folds", 3))
        test_fraction = float(setup.get("test_fraction", 0.3))
        seed = int(setup.get("seed", 0))
        c_preds, c_cuts, _ = _recipe_backtest(
            data, *challenger, horizons, folds, test_fraction, seed
        )
        p_preds, p_cuts, _ = _recipe_backtest(data, *champion, horizons, folds, test_fraction, seed)
        if c_cuts != p_cuts:
            raise InputError(
                "the two models were cut into different folds (their data frequency differs);"
                " they cannot be compared by the gate"
            )
        truth = prepare_frame(data)[["meter_id", "ts", "value"]]
        out: dict[str, dict[str, float]] = {}
        for h in horizons:
            joined = (
                c_preds[h][["meter_id", "ts", "yhat"]]
                .merge(
                    p_preds[h][["meter_id", "ts", "yhat"]],
                    on=["meter_id", "ts"],
                    suffixes=("_c", "_p"),
                )
                .merge(truth, on=["meter_id", "ts"])
            )
            arr = joined[["yhat_c", "yhat_p", "value"]].to_numpy(np.float64)
            arr = arr[np.isfinite(arr).all(axis=1)]
            if not len(arr):
                raise InputError(f"no common backtest points at horizon {h} to compare")
            mc = score(arr[:, 2], arr[:, 0])[metric]
            mp = score(arr[:, 2], arr[:, 1])[metric]
            if mc is None or mp is None:
                raise InputError(f"{metric} is undefined on these points (try rmse)")
            out[f"h{h}"] = {"challenger": float(mc), "champion": float(mp), "points": len(arr)}
        fingerprint = data_fingerprint(data)
        return f"re-run on the same {folds} fold(s) of data {fingerprint}", out
