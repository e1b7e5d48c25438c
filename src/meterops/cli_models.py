"""Model commands of the ``meterops`` CLI: ``backtest``, ``detect``.

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

from meterops.errors import ConfigError, InputError

__all__ = ["backtest", "detect", "register"]


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def backtest(
    data: Annotated[Path, typer.Argument(help="CSV, CSV.gz or Parquet file of readings.")],
    horizon: Annotated[
        str, typer.Option("--horizon", "-H", help="Steps (1) or a duration (30min, 24h, 1d).")
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
    fmt: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    holidays: Annotated[
        str | None, typer.Option("--holidays", help="Public-holiday country code, e.g. FR.")
    ] = None,
    known_covariates: Annotated[
        str | None,
        typer.Option(
            "--known-covariates",
            help="Comma-separated covariates known in advance (e.g. a weather forecast).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the models.")] = 0,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Project config (default: ./meterops.toml)."),
    ] = None,
    meter_col: Annotated[
        str, typer.Option("--meter-col", help="Column holding the meter id.")
    ] = "meter_id",
    ts_col: Annotated[str, typer.Option("--ts-col", help="Column holding the timestamp.")] = "ts",
    value_col: Annotated[
        str, typer.Option("--value-col", help="Column holding the value.")
    ] = "value",
    meter_id: Annotated[
        str | None, typer.Option("--meter-id", help="Meter id for a single-series file.")
    ] = None,
    timezone: Annotated[
        str | None,
        typer.Option("--timezone", help="Zone of naive timestamps and of the calendar."),
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option("--delimiter", help="CSV delimiter (default: sniff).")
    ] = None,
    ts_format: Annotated[
        str | None,
        typer.Option("--ts-format", help="strftime format, e.g. '%d/%m/%Y %H:%M:%S'."),
    ] = None,
) -> None:
    """Backtest the baselines and the candidate models on the same rolling-origin folds.

    Every model is trained before each fold's origin and forecasts each point t
    of the fold from data up to t - H only; `selected` is the model meterops
    would serve, chosen on training data only.

    Example: meterops backtest data.csv.gz --meter-id uci --timezone Europe/Paris
    --horizon 24h --format json --predictions preds.csv
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
    lines = [
        f"horizon {document['horizon']} ({document['horizon_steps']} steps of"
        f" {document['freq']}), {len(document['folds'])} fold(s), {document['meters']} meter(s)"
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
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Project config (default: ./meterops.toml)."),
    ] = None,
    meter_col: Annotated[
        str, typer.Option("--meter-col", help="Column holding the meter id.")
    ] = "meter_id",
    ts_col: Annotated[str, typer.Option("--ts-col", help="Column holding the timestamp.")] = "ts",
    value_col: Annotated[
        str, typer.Option("--value-col", help="Column holding the value.")
    ] = "value",
    meter_id: Annotated[
        str | None, typer.Option("--meter-id", help="Meter id for a single-series file.")
    ] = None,
    timezone: Annotated[
        str | None,
        typer.Option("--timezone", help="Zone of naive timestamps and of daily routines."),
    ] = None,
    delimiter: Annotated[
        str | None, typer.Option("--delimiter", help="CSV delimiter (default: sniff).")
    ] = None,
    ts_format: Annotated[
        str | None,
        typer.Option("--ts-format", help="strftime format, e.g. '%d/%m/%Y %H:%M:%S'."),
    ] = None,
) -> None:
    """Score every reading for anomalies (spike, dropout, level shift, stuck value).

    Unsupervised: the detector learns each meter's normal behaviour from DATA
    itself (or from --fit FILE). `--format csv` prints
    `meter_id,ts,score,is_anomaly` for every reading that parsed, in file
    order; `score` is in [0, 1] and `is_anomaly` is 1 when score >= threshold,
    else 0. `--format json` prints a summary object instead. A `label` column
    ("" normal, else the kind) is never used for detection; when present,
    precision, recall, F1 and recall per kind go to stderr (and into the JSON).

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
        report = detection_report(labels, flags)
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
    lines = [
        f"evaluation against label: precision={report['precision']:.4f}"
        f" recall={report['recall']:.4f} f1={report['f1']:.4f}"
        f" (labelled={report['labelled']} flagged={report['flagged']} tp={report['tp']}"
        f" fp={report['fp']} fn={report['fn']})"
    ]
    for kind, m in report["per_kind"].items():
        lines.append(f"  recall {kind:<12} {m['recall']:.4f}  (n={m['n']})")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add the model commands (``backtest``, ``detect``) to ``app``."""
    app.command("backtest")(backtest)
    app.command("detect")(detect)
