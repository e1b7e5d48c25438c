"""Model commands of the ``meterops`` CLI: ``backtest``, ``detect``, ``train``, ``events``,
``cluster``, ``models``.

:func:`register` adds the commands to the main Typer app (called by
``meterops.cli``). Results go to stdout (one JSON document with
``--format json``), progress and notes to stderr; errors are raised as
:class:`~meterops.errors.InputError` / :class:`~meterops.errors.ConfigError`
for the CLI's ``main()`` to print on one line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from meterops.cli_options import (
    ConfigOpt,
    Delim,
    FormatOpt,
    HolidaysOpt,
    MeterCol,
    MeterId,
    TsCol,
    TsFormat,
    Tz,
    ValueCol,
)
from meterops.errors import ConfigError, InputError

__all__ = [
    "backtest",
    "cluster",
    "detect",
    "events",
    "models_app",
    "models_audit",
    "models_list",
    "models_promote",
    "models_rollback",
    "register",
    "train",
]


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def backtest(
    data: Annotated[Path, typer.Argument(help="CSV, CSV.gz or Parquet file of readings.")],
    horizon: Annotated[
        str,
        typer.Option(
            "--horizon",
            "-H",
            help="Steps (1), a duration (30min, 24h, 1d) or day-ahead@HH:MM: every day at"
            " HH:MM (--timezone), forecast each slot of the next local day.",
        ),
    ] = "1",
    test_start: Annotated[
        str | None,
        typer.Option("--test-start", help="Single split: train before TS, test from TS on."),
    ] = None,
    folds: Annotated[int, typer.Option(help="Rolling-origin folds (without --test-start).")] = 3,
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated models (default: persistence, seasonal_naive_daily,"
            " seasonal_naive_weekly, gbm)."
        ),
    ] = None,
    predictions: Annotated[
        Path | None,
        typer.Option("--predictions", help="Write meter_id,ts,model,yhat,q10,q90 (CSV)."),
    ] = None,
    fmt: FormatOpt = "table",
    holidays: HolidaysOpt = None,
    known_covariates: Annotated[
        str | None,
        typer.Option(
            "--known-covariates",
            help="Comma-separated covariates known in advance (e.g. a weather forecast).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the models.")] = 0,
    config: ConfigOpt = None,
    meter_col: MeterCol = "meter_id",
    ts_col: TsCol = "ts",
    value_col: ValueCol = "value",
    meter_id: MeterId = None,
    timezone: Tz = None,
    delimiter: Delim = None,
    ts_format: TsFormat = None,
) -> None:
    """Backtest the baselines and the candidate models on the same rolling-origin folds.

    Every model is trained before each fold's origin and forecasts each point t
    of the fold from data up to t - H only; `selected` is the model meterops
    would serve, chosen on training data only. With `--horizon day-ahead@10:00`
    each point of a local day is forecast from the data up to 10:00 (local
    time of --timezone) of the day before, as a day-ahead market bid would be.

    Example: meterops backtest data.csv.gz --meter-id uci --timezone Europe/Paris
    --horizon 24h --format json --predictions preds.csv

    Example: meterops backtest data.csv.gz --meter-id uci --timezone Europe/Paris
    --horizon day-ahead@10:00 --format json
    """
    import pandas as pd

    from meterops.backtest import run_backtest
    from meterops.features import FeatureSpec
    from meterops.settings import load_settings
    from meterops.sources.files import FileFormat, read_file
    from meterops.types import REJECT

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json; got {fmt!r}")
    settings = load_settings(config)
    tz = timezone or settings.source.timezone
    file_format = FileFormat(
        meter_col=meter_col,
        ts_col=ts_col,
        value_col=value_col,
        meter_id=meter_id,
        timezone=tz,
        delimiter=delimiter,
        ts_format=ts_format,
    )
    _log_to_stderr()
    batch, summary = read_file(data, file_format)
    frame = batch.table.to_pandas()
    if summary.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.rejected_by_reason.items())
        print(
            f"{summary.rejected} of {summary.rows} rows rejected and not modelled ({reasons})",
            file=sys.stderr,
        )
    if REJECT in frame.columns:
        frame = frame[frame[REJECT].isna()]
    frame = frame[[c for c in frame.columns if not str(c).startswith("_")]]
    print(
        f"read {len(frame)} readings of {frame['meter_id'].nunique()} meter(s) from {data}",
        file=sys.stderr,
    )
    spec = FeatureSpec(timezone=tz, holidays=holidays, known_covariates=_split(known_covariates))
    start = None
    if test_start is not None:
        try:
            start = pd.Timestamp(test_start)
        except ValueError as exc:
            raise InputError(f"--test-start: not a timestamp: {test_start!r}") from exc
        if start.tzinfo is None:
            start = start.tz_localize(tz, ambiguous=False, nonexistent="shift_forward")
    document, preds = run_backtest(
        frame,
        horizon,
        test_start=start,
        folds=folds,
        models=_split(models) or None,
        features=spec,
        seed=seed,
    )
    if predictions is not None:
        out = preds.copy()
        out["ts"] = out["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        out.to_csv(predictions, index=False)
        print(f"wrote {len(out)} predictions to {predictions}", file=sys.stderr)
    if fmt == "json":
        print(json.dumps(document, indent=2, default=_jsonable))
    else:
        print(_table(document))


def _jsonable(value: Any) -> Any:
    return str(value)


def _table(document: dict[str, Any]) -> str:
    cols = ("rmse", "mae", "smape", "mape", "pinball", "coverage_80")
    day_ahead = document.get("day_ahead")
    steps = (
        f"leads {day_ahead['lead_steps'][0]}..{day_ahead['lead_steps'][1]} steps"
        if day_ahead
        else f"{document['horizon_steps']} steps"
    )
    lines = [
        f"horizon {document['horizon']} ({steps} of {document['freq']}),"
        f" {len(document['folds'])} fold(s), {document['meters']} meter(s)"
    ]
    for f in document["folds"]:
        lines.append(
            f"  fold {f['fold']}: {f['origin']} .. {f['end']}  selected={f['selected']}"
            f"  points={f['test_points']}"
        )
    lines.append(f"{'model':<24}" + "".join(f"{c:>12}" for c in cols))
    for name, m in document["models"].items():
        cells = "".join(f"{'-':>12}" if m.get(c) is None else f"{m[c]:>12.4f}" for c in cols)
        lines.append(f"{name:<24}{cells}")
    return "\n".join(lines)


def _log_to_stderr() -> None:
    logger = logging.getLogger("meterops")
    if not any(getattr(h, "_meterops_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._meterops_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def detect(
    data: Annotated[Path, typer.Argument(help="CSV, CSV.gz or Parquet file of readings.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv or json.")] = "csv",
    fit: Annotated[
        Path | None,
        typer.Option("--fit", help="Learn normal behaviour from this file (default: DATA)."),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Score from which a reading is flagged.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Random seed of the multivariate detector.")] = 0,
    config: ConfigOpt = None,
    meter_col: MeterCol = "meter_id",
    ts_col: TsCol = "ts",
    value_col: ValueCol = "value",
    meter_id: MeterId = None,
    timezone: Tz = None,
    delimiter: Delim = None,
    ts_format: TsFormat = None,
) -> None:
    """Score every reading for anomalies (spike, dropout, level shift, stuck value).

    Unsupervised: the detector learns each meter's normal behaviour from DATA
    itself (or from --fit FILE). `--format csv` prints
    `meter_id,ts,score,is_anomaly` for every reading that parsed, in file
    order; `score` is in [0, 1] and `is_anomaly` is 1 when score >= threshold,
    else 0. `--format json` prints a summary object instead. A `label` column
    ("" normal, else the kind) is never used for detection; when present,
    precision, recall, F1, PR-AUC (average precision of the scores) and recall
    and PR-AUC per kind go to stderr (and into the JSON).

    Example: meterops detect fleet.csv --format csv > scores.csv
    """
    from meterops.models.anomaly import AnomalyDetector, detection_report

    if fmt not in ("csv", "json"):
        raise ConfigError(f"--format must be csv or json; got {fmt!r}")
    _log_to_stderr()
    tz = timezone or _timezone(config)
    file_format = _file_format(meter_col, ts_col, value_col, meter_id, tz, delimiter, ts_format)
    frame, labels = _read_readings(data, file_format, with_labels=True)
    detector = AnomalyDetector(timezone=tz, threshold=threshold, seed=seed)
    if fit is not None:
        train, _ = _read_readings(fit, file_format, with_labels=False)
        detector.fit(train)
    else:
        detector.fit(frame)
    scored = detector.score(frame)
    flags = scored["is_anomaly"].to_numpy(bool)
    document: dict[str, Any] = {
        "rows": len(scored),
        "meters": int(scored["meter_id"].nunique()),
        "flagged": int(flags.sum()),
        "threshold": threshold,
        "by_kind": {str(k): int(v) for k, v in scored.loc[flags, "kind"].value_counts().items()},
    }
    if labels is not None:
        report = detection_report(labels, flags, scored["score"].to_numpy())
        document["evaluation"] = report
        print(_report_text(report), file=sys.stderr)
    if fmt == "json":
        print(json.dumps(document, indent=2, default=_jsonable))
        return
    out = scored[["meter_id", "ts", "score", "is_anomaly"]].copy()
    out["ts"] = out["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    out["score"] = out["score"].round(4)
    out["is_anomaly"] = out["is_anomaly"].astype(int)
    out.to_csv(sys.stdout, index=False, lineterminator="\n")


def _timezone(config: Path | None) -> str:
    from meterops.settings import load_settings

    return load_settings(config).source.timezone


def _file_format(
    meter_col: str,
    ts_col: str,
    value_col: str,
    meter_id: str | None,
    tz: str,
    delimiter: str | None,
    ts_format: str | None,
) -> Any:
    from meterops.sources.files import FileFormat

    return FileFormat(
        meter_col=meter_col,
        ts_col=ts_col,
        value_col=value_col,
        meter_id=meter_id,
        timezone=tz,
        delimiter=delimiter,
        ts_format=ts_format,
    )


def _read_readings(path: Path, file_format: Any, with_labels: bool) -> tuple[Any, Any]:
    """The parsed readings of ``path`` (rejected rows left out, noted on stderr) and labels.

    Labels are the file's ``label`` column aligned with the kept rows, or
    ``None`` when there is none (or it cannot be aligned).
    """
    from meterops.sources.files import read_file
    from meterops.types import REJECT

    batch, summary = read_file(path, file_format)
    frame = batch.table.to_pandas()
    keep = frame[REJECT].isna().to_numpy() if REJECT in frame.columns else None
    if summary.rejected:
        reasons = ", ".join(f"{k}: {v}" for k, v in summary.rejected_by_reason.items())
        print(
            f"{summary.rejected} of {summary.rows} rows rejected and not scored ({reasons})",
            file=sys.stderr,
        )
    labels = _labels(path, len(frame)) if with_labels else None
    if keep is not None:
        frame = frame[keep]
        labels = labels[keep] if labels is not None else None
    frame = frame[[c for c in frame.columns if not str(c).startswith("_")]]
    frame = frame.reset_index(drop=True)
    print(
        f"read {len(frame)} readings of {frame['meter_id'].nunique()} meter(s) from {path}",
        file=sys.stderr,
    )
    return frame, labels


def _labels(path: Path, rows: int) -> Any:
    """The ``label`` column of a reading file as strings ("" = normal), or None."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        with path.open("rb") as handle:
            parquet = handle.read(4) == b"PAR1"
        if parquet:
            if "label" not in pq.read_schema(path).names:
                return None
            column = pq.read_table(path, columns=["label"]).column("label").to_pandas()
        else:
            head = pd.read_csv(path, nrows=0, sep=None, engine="python")
            if "label" not in head.columns:
                return None
            first = pd.read_csv(path, nrows=0, header=None, sep="\x00", engine="python")
            line = str(first.columns[0]) if len(first.columns) else ""
            sep = max((",", ";", "\t", "|"), key=line.count)
            column = pd.read_csv(
                path, usecols=["label"], dtype=str, keep_default_na=False, sep=sep
            )["label"]
    except Exception as exc:  # a label we cannot read only costs the summary
        print(f"label column not read ({exc}); no evaluation", file=sys.stderr)
        return None
    if len(column) != rows:
        print(
            f"label column has {len(column)} rows but {rows} readings; no evaluation",
            file=sys.stderr,
        )
        return None
    return np.asarray(column.fillna("").astype(str).str.strip(), dtype=object)


def _report_text(report: dict[str, Any]) -> str:
    pr_auc = report.get("pr_auc")
    auc_text = "" if pr_auc is None else f" pr_auc={pr_auc:.4f}"
    lines = [
        f"evaluation against label: precision={report['precision']:.4f}"
        f" recall={report['recall']:.4f} f1={report['f1']:.4f}{auc_text}"
        f" (labelled={report['labelled']} flagged={report['flagged']} tp={report['tp']}"
        f" fp={report['fp']} fn={report['fn']})"
    ]
    for kind, m in report["per_kind"].items():
        kind_auc = m.get("pr_auc")
        extra = "" if kind_auc is None else f"  pr_auc {kind_auc:.4f}"
        lines.append(f"  recall {kind:<12} {m['recall']:.4f}{extra}  (n={m['n']})")
    return "\n".join(lines)


def _quiet_mlflow() -> None:
    # MLflow logs INFO lines (schema creation, input example checks) on stderr;
    # it sets its logger's level when imported, from this variable.
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def _open_registry(config: Path | None) -> Any:
    from meterops.registry import Registry
    from meterops.settings import load_settings

    _quiet_mlflow()
    return Registry.from_settings(load_settings(config)).open()


def _store_frame(settings: Any) -> tuple[Any, dict[str, Any]]:
    """The stored readings and their lineage (store URL, committed bus offsets)."""
    from meterops.bus.base import READINGS
    from meterops.errors import MeterOpsError
    from meterops.pipeline import Pipeline
    from meterops.settings import redact_url
    from meterops.types import REJECT

    with Pipeline(settings) as pipeline:
        frame = pipeline.store.readings().table.to_pandas()
        lineage: dict[str, Any] = {
            "source": "store",
            "store": redact_url(settings.backends.store),
        }
        try:
            lineage["bus"] = redact_url(settings.backends.bus)
            lineage["bus_committed"] = {
                str(k): v
                for k, v in pipeline.bus.committed(settings.worker.group, READINGS).items()
            }
        except MeterOpsError as exc:
            lineage["bus_committed"] = f"unavailable: {exc}"
    if REJECT in frame.columns:
        frame = frame[frame[REJECT].isna()]
    frame = frame[[c for c in frame.columns if not str(c).startswith("_")]]
    return frame.reset_index(drop=True), lineage


def train(
    data: Annotated[
        Path | None,
        typer.Argument(help="CSV, CSV.gz or Parquet file (default: the readings in the store)."),
    ] = None,
    horizon: Annotated[
        list[str] | None,
        typer.Option(
            "--horizon", "-H", help="Horizon(s): steps (1) or durations (24h); repeat or comma."
        ),
    ] = None,
    folds: Annotated[
        int | None, typer.Option(help="Backtest folds (default: registry.folds).")
    ] = None,
    gate: Annotated[
        bool, typer.Option("--gate/--no-gate", help="Run the champion gate after registering.")
    ] = True,
    margin: Annotated[
        float | None, typer.Option(help="Relative margin to beat (default: registry.gate_margin).")
    ] = None,
    metric: Annotated[
        str | None, typer.Option(help="rmse, mae, smape or mape (default: registry.gate_metric).")
    ] = None,
    n_estimators: Annotated[
        int, typer.Option("--n-estimators", help="Boosting rounds (upper bound).")
    ] = 600,
    seed: Annotated[int, typer.Option(help="Random seed of the model.")] = 0,
    fmt: FormatOpt = "table",
    holidays: HolidaysOpt = None,
    config: ConfigOpt = None,
    meter_col: MeterCol = "meter_id",
    ts_col: TsCol = "ts",
    value_col: ValueCol = "value",
    meter_id: MeterId = None,
    timezone: Tz = None,
) -> None:
    """Train the GBM, backtest it, log it to MLflow as challenger and run the champion gate.

    The run logs parameters, metrics per horizon (rmse_h24, ...), the data
    range, lineage (data fingerprint, file hash or bus offsets), a CodeCarbon
    estimate and the model. The gate promotes it only when it beats the
    champion on the same backtest folds by the margin.

    Example: meterops train fleet.csv --horizon 1 --horizon 24h --format json
    """
    from meterops.features import FeatureSpec
    from meterops.models.gbm import GBMForecaster
    from meterops.registry import (
        CarbonTracker,
        Registry,
        backtest_forecaster,
        data_fingerprint,
        file_sha256,
        input_example,
    )
    from meterops.settings import load_settings

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json; got {fmt!r}")
    settings = load_settings(config)
    reg = settings.registry
    tz = timezone or settings.source.timezone
    horizons = tuple(p for h in (horizon or ["1"]) for p in _split(h)) or ("1",)
    _log_to_stderr()
    _quiet_mlflow()
    if data is not None:
        file_format = _file_format(meter_col, ts_col, value_col, meter_id, tz, None, None)
        frame, _ = _read_readings(data, file_format, with_labels=False)
        lineage: dict[str, Any] = {
            "source": "file",
            "path": str(data.resolve()),
            "file_sha256": file_sha256(data),
        }
    else:
        frame, lineage = _store_frame(settings)
        print(f"read {len(frame)} readings from the store", file=sys.stderr)
    if frame.empty:
        raise InputError("no readings to train on")
    spec = FeatureSpec(timezone=tz, holidays=holidays)
    model = GBMForecaster(horizons=horizons, features=spec, n_estimators=n_estimators, seed=seed)
    with CarbonTracker(reg.carbon_country) as carbon:
        scores, info = backtest_forecaster(frame, model, folds=folds or reg.folds)
        model.fit(frame)
    fingerprint = data_fingerprint(frame)
    lineage["fingerprint"] = fingerprint
    ts = frame["ts"]
    data_range = {
        "start": str(ts.min()),
        "end": str(ts.max()),
        "rows": len(frame),
        "meters": int(frame["meter_id"].nunique()),
    }
    with Registry.from_settings(settings) as registry:
        version = registry.log_training_run(
            model,
            {"folds": info.folds, "horizons": ",".join(horizons)},
            scores,
            data_range,
            fingerprint,
            carbon.emissions,
            input_example(frame),
            backtest=info,
            lineage=lineage,
        )
        print(f"registered {reg.model_name} version {version} as challenger", file=sys.stderr)
        verdict = None
        if gate:
            verdict = registry.gate(
                version,
                metric=metric or reg.gate_metric,
                margin=reg.gate_margin if margin is None else margin,
                data=frame,
            )
    document: dict[str, Any] = {
        "model_name": reg.model_name,
        "version": version,
        "metrics": {f"h{h}": m for h, m in scores.items()},
        "data": data_range,
        "fingerprint": fingerprint,
        "emissions": carbon.emissions.__dict__,
        "gate": None if verdict is None else verdict.to_dict(),
    }
    if fmt == "json":
        print(json.dumps(document, indent=2, default=_jsonable))
        return
    lines = [f"version {version} of {reg.model_name} (challenger)"]
    for h, m in scores.items():
        lines.append(f"  h{h}: rmse={m['rmse']:.4f} mae={m['mae']:.4f} points={m['n']}")
    em = carbon.emissions
    lines.append(f"  emissions: {em.kg_co2eq:.3g} kg CO2eq, {em.energy_kwh:.3g} kWh")
    if verdict is None:
        lines.append("  gate skipped (--no-gate)")
    else:
        lines.append(
            ("  PROMOTED: " if verdict.promoted else "  kept as challenger: ") + verdict.reason
        )
    print("\n".join(lines))


def events(
    data: Annotated[Path, typer.Argument(help="CSV, CSV.gz or Parquet file of readings.")],
    target: Annotated[
        str,
        typer.Option(
            "--target",
            "-t",
            help="The event: COLUMN OP NUMBER, OP one of > >= < <= (e.g. 'precipitation>1');"
            " COLUMN is the value column or a numeric covariate.",
        ),
    ],
    horizon: Annotated[
        str,
        typer.Option(
            "--horizon", "-H", help="The period ahead: steps (1) or a duration (1d, 24h)."
        ),
    ] = "1",
    aggregation: Annotated[
        str, typer.Option("--aggregation", help="sum, mean or max over the period.")
    ] = "sum",
    test_start: Annotated[
        str | None,
        typer.Option("--test-start", help="Single split: train before TS, test from TS on."),
    ] = None,
    folds: Annotated[int, typer.Option(help="Rolling-origin folds (without --test-start).")] = 3,
    calibration: Annotated[
        str, typer.Option("--calibration", help="platt, isotonic or none.")
    ] = "platt",
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions",
            help="Write meter_id,ts,model,probability,event (CSV; event = observed outcome).",
        ),
    ] = None,
    fmt: FormatOpt = "table",
    holidays: HolidaysOpt = None,
    known_covariates: Annotated[
        str | None,
        typer.Option(
            "--known-covariates",
            help="Comma-separated covariates known in advance (never the event column).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the model.")] = 0,
    config: ConfigOpt = None,
    meter_col: MeterCol = "meter_id",
    ts_col: TsCol = "ts",
    value_col: ValueCol = "value",
    meter_id: MeterId = None,
    timezone: Tz = None,
    delimiter: Delim = None,
    ts_format: TsFormat = None,
) -> None:
    """Backtest an event probability model against climatology and persistence.

    The event of target time t aggregates COLUMN over the period t - H + 1 .. t
    and compares it with the threshold; every probability for t is made from
    data up to t - H only. The model (calibrated LightGBM, `gbm`), `climatology`
    (the training base rate) and `persistence` (the last known period's event)
    are judged on the same rolling-origin folds: Brier, ROC-AUC, log loss and
    F1 at a threshold chosen on training data only.

    Example: meterops events seattle-weather.csv --ts-col date --value-col precipitation
    --meter-id seattle --target "precipitation>1" --horizon 1d --format json
    """
    from dataclasses import replace

    import pandas as pd

    from meterops.features import FeatureSpec
    from meterops.models.events import EventTarget, backtest_events

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json; got {fmt!r}")
    event = EventTarget.parse(target, horizon=horizon, aggregation=aggregation)
    if event.column == value_col:  # the file's value column is `value` once read
        event = replace(event, column="value")
    _log_to_stderr()
    tz = timezone or _timezone(config)
    file_format = _file_format(meter_col, ts_col, value_col, meter_id, tz, delimiter, ts_format)
    frame, _ = _read_readings(data, file_format, with_labels=False)
    if frame.empty:
        raise InputError(f"{data}: no readings to model")
    spec = FeatureSpec(timezone=tz, holidays=holidays, known_covariates=_split(known_covariates))
    start = None
    if test_start is not None:
        try:
            start = pd.Timestamp(test_start)
        except ValueError as exc:
            raise InputError(f"--test-start: not a timestamp: {test_start!r}") from exc
        if start.tzinfo is None:
            start = start.tz_localize(tz, ambiguous=False, nonexistent="shift_forward")
    document, preds = backtest_events(
        frame,
        event,
        test_start=start,
        folds=folds,
        features=spec,
        seed=seed,
        params={"calibration": calibration},
    )
    if event.column == "value":  # report the event by the file's column name
        document["target"]["column"] = value_col
        document["event"] = str(replace(event, column=value_col))
    if predictions is not None:
        out = preds.copy()
        out["ts"] = out["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        out["event"] = out["event"].astype("Int64")
        out.to_csv(predictions, index=False)
        print(f"wrote {len(out)} predictions to {predictions}", file=sys.stderr)
    if fmt == "json":
        print(json.dumps(document, indent=2, default=_jsonable))
    else:
        print(_events_table(document))


def _events_table(document: dict[str, Any]) -> str:
    cols = ("brier", "roc_auc", "log_loss", "f1", "precision", "recall")
    lines = [
        f"event {document['event']} ({document['horizon_steps']} steps of {document['freq']}),"
        f" {len(document['folds'])} fold(s), {document['meters']} meter(s)"
    ]
    for f in document["folds"]:
        lines.append(
            f"  fold {f['fold']}: {f['origin']} .. {f['end']}  base_rate={f['base_rate']:.3f}"
            f"  threshold={f['thresholds']['gbm']:.3f}  points={f['test_points']}"
        )
    lines.append(f"{'model':<24}" + "".join(f"{c:>12}" for c in cols))
    for name, m in document["models"].items():
        cells = "".join(f"{'-':>12}" if m.get(c) is None else f"{m[c]:>12.4f}" for c in cols)
        lines.append(f"{name:<24}{cells}")
    return "\n".join(lines)


def cluster(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="CSV, CSV.gz or Parquet file (default: the readings in the store, and the"
            " result is saved per meter)."
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("--k", help="Number of clusters (default: best silhouette in --k-range)."),
    ] = None,
    k_range: Annotated[
        str, typer.Option("--k-range", help="LOW,HIGH: the numbers of clusters to try.")
    ] = "2,8",
    save: Annotated[
        bool,
        typer.Option("--save/--no-save", help="Store each meter's cluster (store readings only)."),
    ] = True,
    seed: Annotated[int, typer.Option(help="Random seed of KMeans.")] = 0,
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
    meter_col: MeterCol = "meter_id",
    ts_col: TsCol = "ts",
    value_col: ValueCol = "value",
    meter_id: MeterId = None,
    timezone: Tz = None,
) -> None:
    """Group meters by their normalised daily load profile (KMeans) and store the clusters.

    Each meter becomes its mean reading per local hour of the day divided by its
    overall mean (scale-free: a big and a small office look alike); KMeans groups
    the shapes, the number of clusters chosen by the best silhouette unless --k
    is given. From the store (no DATA), each meter's cluster is saved and shown
    by the store's meter list (`cluster` column; -1 = not enough data for a
    full daily profile). With DATA the result is printed only.

    Example: meterops cluster --format json

    Example: meterops cluster fleet.csv --k 4 --timezone Europe/Paris
    """
    import numpy as np

    from meterops.models.clustering import fit_clusters
    from meterops.settings import load_settings

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json; got {fmt!r}")
    try:
        low, high = (int(p) for p in k_range.split(","))
    except ValueError as exc:
        raise ConfigError(f"--k-range must be LOW,HIGH (e.g. 2,8); got {k_range!r}") from exc
    settings = load_settings(config)
    tz = timezone or settings.source.timezone
    _log_to_stderr()
    saved = False
    if data is not None:
        file_format = _file_format(meter_col, ts_col, value_col, meter_id, tz, None, None)
        frame, _ = _read_readings(data, file_format, with_labels=False)
        result = fit_clusters(frame, k=k, k_range=(low, high), timezone=tz, seed=seed)
        source = str(data)
    else:
        from meterops.pipeline import Pipeline
        from meterops.types import REJECT

        with Pipeline(settings) as pipeline:
            frame = pipeline.store.readings().table.to_pandas()
            if REJECT in frame.columns:
                frame = frame[frame[REJECT].isna()]
            print(
                f"read {len(frame)} readings of {frame['meter_id'].nunique()} meter(s)"
                " from the store",
                file=sys.stderr,
            )
            if frame.empty:
                raise InputError("no readings in the store to cluster (ingest some first)")
            result = fit_clusters(frame, k=k, k_range=(low, high), timezone=tz, seed=seed)
            if save:
                pipeline.store.set_clusters(_assignments(result.labels))
                saved = True
        source = "store"
    sizes = result.sizes()
    document: dict[str, Any] = {
        "source": source,
        "meters": len(result.labels),
        "clustered": int((result.labels >= 0).sum()),
        "k": result.k,
        "silhouette": result.silhouette,
        "timezone": tz,
        "saved": saved,
        "clusters": [
            {
                "cluster": c,
                "meters": sizes.get(c, 0),
                "peak_hour": int(np.argmax(shape)) * 24 // len(shape),
                "profile": [round(float(v), 4) for v in shape],
            }
            for c, shape in zip(
                result.profiles.index.to_numpy(np.int64).tolist(),
                result.profiles.to_numpy(np.float64),
                strict=True,
            )
        ],
        "assignments": _assignments(result.labels),
    }
    if fmt == "json":
        print(json.dumps(document, indent=2, default=_jsonable))
        return
    quality = "-" if result.silhouette is None else f"{result.silhouette:.3f}"
    lines = [
        f"{document['clustered']} of {document['meters']} meter(s) in {result.k} cluster(s)"
        f" (silhouette {quality}, local time {tz})" + ("; saved to the store" if saved else "")
    ]
    lines.append(f"{'cluster':>7}  {'meters':>6}  {'peak':>5}  examples")
    for item in document["clusters"]:
        members = [m for m, c in document["assignments"].items() if c == item["cluster"]]
        shown = ", ".join(members[:4]) + (" ..." if len(members) > 4 else "")
        lines.append(f"{item['cluster']:>7}  {item['meters']:>6}  {item['peak_hour']:>4}h  {shown}")
    if sizes.get(-1):
        lines.append(f"{-1:>7}  {sizes[-1]:>6}  {'-':>5}  (no full daily profile yet)")
    print("\n".join(lines))


def _assignments(labels: Any) -> dict[str, int]:
    """``meter_id -> cluster`` as plain Python types (for the store and JSON)."""
    return dict(
        zip(
            [str(m) for m in labels.index],
            labels.to_numpy().astype(int).tolist(),
            strict=True,
        )
    )


models_app = typer.Typer(
    help="The model registry: list, promote, roll back, audit.\n\nExample: meterops models list",
    no_args_is_help=True,
)


@models_app.command("list")
def models_list(
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
) -> None:
    """List registered versions with aliases, metrics and created time, newest first.

    Example: meterops models list --format json
    """
    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json; got {fmt!r}")
    with _open_registry(config) as registry:
        versions = registry.list()
    if fmt == "json":
        print(json.dumps([v.to_dict() for v in versions], indent=2, default=_jsonable))
        return
    if not versions:
        print("no model versions yet (train one with: meterops train DATA)")
        return
    print(f"{'version':>7}  {'aliases':<22} {'created':<21} {'model':<8} metrics")
    for v in versions:
        # backtest metrics of trained versions, prequential ones of logged online learners
        shown = {
            k: v.metrics[k]
            for k in sorted(v.metrics)
            if k.startswith(("rmse_", "mae_", "prequential_rmse_", "prequential_persistence_rmse_"))
        }
        cells = " ".join(f"{k}={x:.4g}" for k, x in shown.items())
        aliases = ",".join(v.aliases) or v.tags.get("status", "-")
        print(
            f"{v.version:>7}  {aliases:<22} {v.created:<21} {v.tags.get('model', '?'):<8} {cells}"
        )


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="Version number to make champion.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail).")],
    config: ConfigOpt = None,
) -> None:
    """Make VERSION the champion now, bypassing the gate (audited).

    Example: meterops models promote 3 --reason "gate margin too strict for winter data"
    """
    with _open_registry(config) as registry:
        record = registry.promote(version, reason)
    print(f"champion: version {record.from_version} -> {record.to_version} ({record.reason})")


@models_app.command("rollback")
def models_rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail).")],
    config: ConfigOpt = None,
) -> None:
    """Give the champion alias back to the previous champion (audited).

    Example: meterops models rollback --reason "v4 drifts on meter m-17"
    """
    with _open_registry(config) as registry:
        record = registry.rollback(reason)
    print(f"champion: version {record.from_version} -> {record.to_version} ({record.reason})")


@models_app.command("audit")
def models_audit(
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
) -> None:
    """Show every promotion and rollback: when, from which version to which, why.

    Example: meterops models audit --format json
    """
    if fmt not in ("table", "json"):
        raise ConfigError(f"--format must be table or json; got {fmt!r}")
    with _open_registry(config) as registry:
        records = registry.audit()
    if fmt == "json":
        print(json.dumps([r.to_dict() for r in records], indent=2, default=_jsonable))
        return
    if not records:
        print("no promotions yet")
    for r in records:
        start = "-" if r.from_version is None else f"v{r.from_version}"
        print(f"{r.at}  {r.action:<8} {start} -> v{r.to_version}  {r.reason}")


def register(app: typer.Typer) -> None:
    """Add the model commands (``backtest``, ``detect``, ``train``, ``events``, ``cluster``,
    ``models``)."""
    app.command("backtest")(backtest)
    app.command("detect")(detect)
    app.command("train")(train)
    app.command("events")(events)
    app.command("cluster")(cluster)
    app.add_typer(models_app, name="models")
