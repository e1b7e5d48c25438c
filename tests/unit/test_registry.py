"""The MLflow registry: logging, storage round trip, gate, promote / rollback, audit, CLI.

Every test works in its own temp directory on a copy of one SQLite tracking
database whose schema is created once per module (MLflow's migrations take
seconds). Nothing leaves the machine: the backend is a local file and
CodeCarbon runs offline.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from meterops.cli_models import register
from meterops.errors import ConfigError, InputError, NotFound
from meterops.features import FeatureSpec
from meterops.models.base import Forecaster
from meterops.models.baselines import Persistence, SeasonalNaive
from meterops.models.gbm import GBMForecaster
from meterops.registry import (
    CHAMPION,
    Emissions,
    Registry,
    backtest_forecaster,
    data_fingerprint,
    input_example,
    load_forecaster,
    save_forecaster,
)

SPEC = FeatureSpec(seasonal_periods=("1d",), rolling_windows=("1d",), seasonal_means=1)
EMISSIONS = Emissions(kg_co2eq=1e-6, energy_kwh=1e-5, duration_s=0.5, country="FRA")


def fleet(days: int = 14, meters: int = 2, seed: int = 0) -> pd.DataFrame:
    """Hourly meters with a strong daily cycle: seasonal-naive beats persistence at 1 step."""
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-03-01", periods=24 * days, freq="h", tz="UTC")
    hours = ts.hour.to_numpy()
    parts = []
    for i in range(meters):
        value = 10 + i + 5 * np.sin(2 * np.pi * hours / 24) + rng.normal(0, 0.2, len(ts))
        parts.append(pd.DataFrame({"meter_id": f"m-{i}", "ts": ts, "value": value}))
    return pd.concat(parts, ignore_index=True)


def tiny_gbm(**overrides: Any) -> GBMForecaster:
    params: dict[str, Any] = {
        "horizons": (1,),
        "features": SPEC,
        "n_estimators": 20,
        "num_leaves": 7,
        "min_child_samples": 10,
        "early_stopping": 5,
        "min_history": 24,
        "min_train_rows": 50,
    }
    params.update(overrides)
    return GBMForecaster(**params)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its schema created (copied by every test)."""
    from meterops.registry import _mlflow, _quiet

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    with _quiet():
        client = _mlflow().MlflowClient(tracking_uri=f"sqlite:///{path}")
        client.search_registered_models()
    return path


@pytest.fixture
def registry(tmp_path: Path, template_db: Path) -> Iterator[Registry]:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Registry(uri, artifact_root=tmp_path / "artifacts") as reg:
        yield reg


def log(
    registry: Registry,
    model: Forecaster,
    frame: pd.DataFrame,
    backtest: bool = True,
) -> int:
    """Backtest ``model``'s recipe, fit it on ``frame`` and register it (the train flow)."""
    scores, info = backtest_forecaster(frame, model, folds=2)
    model.fit(frame)
    ts = frame["ts"]
    return registry.log_training_run(
        model,
        {"purpose": "test"},
        scores,
        {"start": ts.min(), "end": ts.max(), "rows": len(frame), "meters": 2},
        data_fingerprint(frame),
        EMISSIONS,
        input_example(frame),
        backtest=info if backtest else None,
        lineage={"source": "test"},
    )


def test_storage_round_trip_forecasts_the_same_numbers(tmp_path: Path) -> None:
    frame = fleet(days=10)
    model = tiny_gbm(horizons=(1, 3)).fit(frame)
    loaded = load_forecaster(save_forecaster(model, tmp_path / "m"))
    assert isinstance(loaded, GBMForecaster)
    pd.testing.assert_frame_equal(loaded.forecast(frame, 3), model.forecast(frame, 3))
    pd.testing.assert_frame_equal(loaded.predict(frame, 1), model.predict(frame, 1))
    naive = SeasonalNaive(period="1d").fit(frame)
    back = load_forecaster(save_forecaster(naive, tmp_path / "n"))
    pd.testing.assert_frame_equal(back.forecast(frame, 2), naive.forecast(frame, 2))
    assert not list((tmp_path / "m").rglob("*.pkl"))  # nothing pickled


def test_fingerprint_ignores_row_order_and_sees_values() -> None:
    frame = fleet(days=2)
    shuffled = frame.sample(frac=1.0, random_state=1)
    assert data_fingerprint(frame) == data_fingerprint(shuffled)
    changed = frame.copy()
    changed.loc[5, "value"] += 1e-9
    assert data_fingerprint(changed) != data_fingerprint(frame)


def test_run_logs_params_metrics_range_lineage_emissions_and_model(registry: Registry) -> None:
    from mlflow.models import Model

    frame = fleet(days=10)
    model = tiny_gbm()
    version = log(registry, model, frame)
    assert version == 1
    [info] = registry.list()
    assert info.aliases == ("challenger",)
    run = registry.client.get_run(info.run_id)
    assert run.data.params["model.n_estimators"] == "20"
    assert run.data.params["purpose"] == "test"
    assert run.data.metrics["rmse_h1"] > 0 and run.data.metrics["n_h1"] > 0
    assert run.data.metrics["emissions_kg_co2eq"] == pytest.approx(1e-6)
    assert run.data.metrics["energy_kwh"] == pytest.approx(1e-5)
    tags = run.data.tags
    assert tags["meterops.fingerprint"] == data_fingerprint(frame)
    assert tags["meterops.data_start"].startswith("2024-03-01")
    assert tags["meterops.backtest_key"].startswith("sha256:")
    assert json.loads(tags["meterops.lineage"]) == {"source": "test"}
    local = registry.client.download_artifacts(info.run_id, "model", str(registry.artifact_root))
    mlmodel = Model.load(local)
    assert mlmodel.signature is not None
    assert "meter_id" in mlmodel.signature.inputs.input_names()
    assert mlmodel.saved_input_example_info is not None
    assert (Path(local) / "artifacts" / "forecaster" / "forecaster.json").is_file()


def test_load_champion_forecasts_as_before_saving(registry: Registry) -> None:
    frame = fleet(days=10)
    model = tiny_gbm()
    version = log(registry, model, frame)
    result = registry.gate(version)
    assert result.promoted and result.champion is None  # the first model becomes champion
    loaded = registry.load(CHAMPION)
    pd.testing.assert_frame_equal(loaded.forecast(frame, 1), model.forecast(frame, 1))
    with pytest.raises(NotFound):
        registry.load(99)


def test_gate_accepts_a_better_and_rejects_a_worse_challenger(registry: Registry) -> None:
    frame = fleet()
    first = log(registry, Persistence(), frame)
    assert registry.gate(first).promoted
    better = log(registry, SeasonalNaive(period="1d"), frame)
    verdict = registry.gate(better, metric="rmse", margin=0.02)
    assert verdict.promoted and verdict.champion == first
    assert verdict.evidence.startswith("logged metrics on the same backtest")
    scores = verdict.per_horizon["h1"]
    assert scores["challenger"] <= scores["champion"] * 0.98
    assert registry.champion() == better
    # A worse challenger on other data: the gate re-runs both on the same folds.
    worse = log(registry, Persistence(), fleet(seed=5))
    with pytest.raises(InputError, match="different"):
        registry.gate(worse)
    verdict = registry.gate(worse, data=frame)
    assert not verdict.promoted and verdict.evidence.startswith("re-run")
    assert verdict.per_horizon["h1"]["challenger"] > verdict.per_horizon["h1"]["champion"]
    assert registry.champion() == better
    tags = {v.version: v.tags for v in registry.list()}
    assert tags[worse]["status"] == "rejected"
    assert "does not beat" in tags[worse]["gate"]


def test_promote_rollback_promote_round_trip_is_audited(registry: Registry) -> None:
    frame = fleet(days=8)
    v1, v2 = (log(registry, m, frame) for m in (Persistence(), SeasonalNaive(period="1d")))
    with pytest.raises(NotFound, match="no previous champion"):
        registry.rollback("nothing to roll back")
    registry.promote(v1, "bootstrap")
    with pytest.raises(NotFound, match="no previous champion"):
        registry.rollback("only one champion so far")
    registry.promote(v2, "better in review")
    back = registry.rollback("v2 misbehaves")
    assert (back.from_version, back.to_version) == (v2, v1)
    assert registry.champion() == v1
    registry.promote(v2, "fixed upstream data")
    assert registry.champion() == v2
    with pytest.raises(ConfigError):
        registry.promote(v2, "again")
    with pytest.raises(ConfigError):
        registry.promote(v1, "   ")
    trail = registry.audit()
    assert [(r.action, r.from_version, r.to_version) for r in trail] == [
        ("promote", None, v1),
        ("promote", v1, v2),
        ("rollback", v2, v1),
        ("promote", v1, v2),
    ]
    assert trail[2].reason == "v2 misbehaves" and "rmse_h1" in trail[2].metrics
    assert all(r.at.endswith("Z") for r in trail)
    # durable: a fresh client on the same database sees the same trail
    with Registry(registry.tracking_uri, artifact_root=registry.artifact_root) as again:
        assert [r.to_dict() for r in again.audit()] == [r.to_dict() for r in trail]
        assert again.champion() == v2


@pytest.mark.slow
def test_cli_train_list_promote_rollback_audit(tmp_path: Path, template_db: Path) -> None:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    config = tmp_path / "meterops.toml"
    config.write_text('[registry]\ntracking_uri = "sqlite:///mlflow.db"\nfolds = 2\n')
    data = tmp_path / "fleet.csv"
    fleet(days=10).to_csv(data, index=False)
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.stdout

    for args in (["train"], ["models", "list"], ["models", "rollback"], ["models", "audit"]):
        help_text = runner.invoke(app, [*args, "--help"]).stdout
        assert "Example:" in help_text
    first = json.loads(run("train", str(data), "--n-estimators", "20", "--format", "json"))
    assert first["version"] == 1 and first["gate"]["promoted"]
    assert first["metrics"]["h1"]["rmse"] > 0 and first["emissions"]["kg_co2eq"] >= 0
    second = json.loads(
        run("train", str(data), "-H", "1", "--n-estimators", "20", "--format", "json")
    )
    # same data, same recipe, same folds: equal metrics, so it cannot beat by the margin
    assert second["version"] == 2 and not second["gate"]["promoted"]
    assert "logged metrics" in second["gate"]["evidence"]
    listed = json.loads(run("models", "list", "--format", "json"))
    assert [(v["version"], v["aliases"]) for v in listed] == [
        (2, ["challenger"]),
        (1, ["champion"]),
    ]
    assert "champion: version 1 -> 2" in run("models", "promote", "2", "--reason", "manual")
    assert "champion: version 2 -> 1" in run("models", "rollback", "--reason", "oops")
    trail = json.loads(run("models", "audit", "--format", "json"))
    assert [r["action"] for r in trail] == ["promote", "promote", "rollback"]
    assert "rollback" in run("models", "audit")
    failed = runner.invoke(app, ["models", "rollback", "--reason", "x", "--config", str(config)])
    assert isinstance(failed.exception, NotFound)
    assert (tmp_path / ".meterops" / "mlartifacts").is_dir()


def test_online_model_storage_round_trip_resumes_learning(tmp_path: Path) -> None:
    from meterops.models.online import OnlineForecaster

    frame = fleet(days=12)
    cut = frame["ts"].min() + pd.Timedelta("10d")
    model = OnlineForecaster(horizon=2, features=FeatureSpec(freq="1h")).fit(
        frame[frame["ts"] < cut]
    )
    path = save_forecaster(model, tmp_path / "online")
    assert (path / "forecaster.json").is_file() and (path / "online_state.npz").is_file()
    assert not list(path.rglob("*.pkl"))  # nothing pickled
    with np.load(path / "online_state.npz", allow_pickle=False) as npz:
        assert "values" in npz.files and "xtx" in npz.files
    loaded = load_forecaster(path)
    assert isinstance(loaded, OnlineForecaster)
    assert loaded.get_params() == model.get_params()
    pd.testing.assert_frame_equal(
        loaded.forecast(frame[frame["ts"] < cut], 2), model.forecast(frame[frame["ts"] < cut], 2)
    )
    pd.testing.assert_frame_equal(
        loaded.predict(frame, 2, start=cut), model.predict(frame, 2, start=cut)
    )
    later = frame[frame["ts"] >= cut]
    np.testing.assert_array_equal(loaded.predict_learn_many(later), model.predict_learn_many(later))


def test_online_model_is_logged_backtested_and_loaded(registry: Registry) -> None:
    from meterops.models.online import OnlineForecaster

    frame = fleet(days=14)
    model = OnlineForecaster(horizon=1, features=FeatureSpec(freq="1h"))
    version = log(registry, model, frame)
    run = registry.client.get_run(registry.list()[0].run_id)
    assert run.data.metrics["rmse_h1"] > 0
    loaded = registry.load(version)
    assert isinstance(loaded, OnlineForecaster)
    pd.testing.assert_frame_equal(loaded.forecast(frame, 1), model.forecast(frame, 1))
