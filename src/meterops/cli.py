"""The ``meterops`` command line (Typer).

Every command loads settings once (``--config PATH`` or ``./meterops.toml``)
and calls the pipeline; errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from meterops.cli_models import register as register_model_commands
from meterops.cli_options import (
    ConfigOpt,
    Delim,
    FormatOpt,
    MeterCol,
    MeterId,
    TsCol,
    TsFormat,
    Tz,
    ValueCol,
)
from meterops.errors import BackendError, InputError, MeterOpsError
from meterops.settings import CONFIG_NAME, DEFAULT_TOML, Settings, load_settings, redact_url

__all__ = ["app", "main"]

app = typer.Typer(
    name="meterops",
    help="MLOps for meter and sensor streams.\n\nExample: meterops init && meterops up",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
deadletters_app = typer.Typer(help="List and replay rejected readings.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks that print numbers beside a baseline.", no_args_is_help=True
)
app.add_typer(deadletters_app, name="deadletters")
app.add_typer(bench_app, name="bench")
register_model_commands(app)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(config, **overrides)


def _file_format(
    meter_col: str,
    ts_col: str,
    value_col: str,
    meter_id: str | None,
    tz: str | None,
    settings: Settings,
    delimiter: str | None = None,
    ts_format: str | None = None,
) -> Any:
    from meterops.sources.files import FileFormat

    return FileFormat(
        meter_col=meter_col,
        ts_col=ts_col,
        value_col=value_col,
        meter_id=meter_id,
        timezone=tz or settings.source.timezone,
        delimiter=delimiter,
        ts_format=ts_format,
    )


ProfileOpt = Annotated[
    str,
    typer.Option(
        help="default: the backends in the config; scaled: start Kafka and PostgreSQL on "
        "loopback and use them."
    ),
]


def _check_profile(profile: str) -> None:
    from meterops.services.stack import PROFILES

    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; valid profiles are: {', '.join(PROFILES)}")


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Project directory.")] = Path(),
    force: Annotated[bool, typer.Option(help="Overwrite an existing config.")] = False,
) -> None:
    """Write a commented default meterops.toml.

    Example: meterops init ./myproject
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_NAME
    if path.exists() and not force:
        raise InputError(f"{path} exists already (use --force to overwrite)")
    path.write_text(DEFAULT_TOML, encoding="utf-8")
    out.print(f"wrote {path}; next: meterops up (or meterops ingest FILE)")


def _print_summary(summary: Any) -> None:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.rejected_by_reason.items()))
    out.print(
        f"read {summary.rows} rows ({summary.meters} meters, {summary.ts_min} .. {summary.ts_max});"
        f" {summary.rejected} unreadable" + (f" ({reasons})" if reasons else "")
    )


def _publish_file(settings: Settings, path: Path, fmt: Any, speed: float | None) -> int:
    from meterops.pipeline import Pipeline
    from meterops.sources.files import read_file
    from meterops.sources.replay import in_time_order, paced

    batch, summary = read_file(path, fmt)
    _print_summary(summary)
    batch = in_time_order(batch)
    with Pipeline(settings) as pipe, _progress() as progress:
        task = progress.add_task(f"publishing {path.name}", total=len(batch))
        for sent in pipe.publish(paced(batch, speed, settings.source.chunk_rows)):
            progress.advance(task, sent)
    return len(batch)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        TimeElapsedColumn(),
        console=err,
        transient=not err.is_terminal,
        disable=not err.is_terminal,
    )


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="CSV, CSV.gz or Parquet file.")],
    config: ConfigOpt = None,
    meter_col: MeterCol = "meter_id",
    ts_col: TsCol = "ts",
    value_col: ValueCol = "value",
    meter_id: MeterId = None,
    timezone: Tz = None,
    delimiter: Delim = None,
    ts_format: TsFormat = None,
    wait: Annotated[
        bool, typer.Option(help="Also process the bus until idle and print what was stored.")
    ] = True,
) -> None:
    """Publish a file's readings to the bus and (by default) store them now.

    Bad rows are dead-lettered with a reason; a summary is printed.

    Example: meterops ingest readings.csv --ts-col time --value-col kwh --timezone Europe/Paris
    """
    from meterops.pipeline import Pipeline

    settings = _settings(config)
    fmt = _file_format(
        meter_col, ts_col, value_col, meter_id, timezone, settings, delimiter, ts_format
    )
    with Pipeline(settings) as pipe:
        before = pipe.store.counts()
    _publish_file(settings, file, fmt, None)
    if not wait:
        out.print("published; run `meterops worker` to store the readings")
        return
    with Pipeline(settings) as pipe:
        totals = pipe.worker().run(until_idle=True)
        after = pipe.store.counts()
    new_dead = {
        k: v - before.deadletters_by_reason.get(k, 0)
        for k, v in after.deadletters_by_reason.items()
        if v > before.deadletters_by_reason.get(k, 0)
    }
    out.print(
        f"processed {totals.rows} readings: stored {after.readings - before.readings} new, "
        f"{totals.duplicates} duplicates, {after.deadletters - before.deadletters} dead letters"
    )
    for reason, count in sorted(new_dead.items(), key=lambda kv: -kv[1]):
        out.print(f"  {count:>8}  {reason}")


@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="CSV, CSV.gz or Parquet file.")],
    speed: Annotated[
        float | None,
        typer.Option(help="Times real time (3600 = one hour of data per second); default: max."),
    ] = None,
    config: ConfigOpt = None,
    meter_col: MeterCol = "meter_id",
    ts_col: TsCol = "ts",
    value_col: ValueCol = "value",
    meter_id: MeterId = None,
    timezone: Tz = None,
    delimiter: Delim = None,
    ts_format: TsFormat = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Tabular mode: stream a table of features plus this numeric column and score "
            "an online regressor per micro-batch (the reading options do not apply)."
        ),
    ] = None,
    features: Annotated[
        str | None,
        typer.Option(help="With --target: comma-separated feature columns (default: all others)."),
    ] = None,
    batch_rows: Annotated[
        int | None, typer.Option(help="With --target: rows per micro-batch (default 20).")
    ] = None,
    shuffle: Annotated[
        bool, typer.Option("--shuffle", help="With --target: stream the rows in random order.")
    ] = False,
    seed: Annotated[int, typer.Option(help="With --shuffle: random seed.")] = 0,
    fmt: FormatOpt = "table",
) -> None:
    """Replay a file into the bus in timestamp order (workers store it).

    With --target, replay a table instead (the Kappa-stream scenario): its
    rows go to the bus topic "tabular", come back through a consumer group in
    micro-batches, and an online ridge regressor predicts each micro-batch
    before learning from it; one line per micro-batch gives its RMSE, MAE and
    cumulative RMSE beside a running-mean baseline.

    Examples:
      meterops replay data/uci_household_power_hourly.csv.gz --speed 36000
      meterops replay data/vehicles_co2.csv --target co2_g_km --format json
    """
    settings = _settings(config)
    if target is None:
        tabular_only = {
            "--features": features is not None,
            "--batch-rows": batch_rows is not None,
            "--shuffle": shuffle,
            "--format": fmt != "table",
        }
        given = [name for name, on in tabular_only.items() if on]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise InputError(f"{', '.join(given)} {verb} --target COLUMN (tabular mode)")
        fmt_in = _file_format(
            meter_col, ts_col, value_col, meter_id, timezone, settings, delimiter, ts_format
        )
        sent = _publish_file(settings, file, fmt_in, speed)
        out.print(f"published {sent} readings to the bus")
        return
    from meterops import kappa

    readings_only = {
        "--speed": speed is not None,
        "--meter-col": meter_col != "meter_id",
        "--ts-col": ts_col != "ts",
        "--value-col": value_col != "value",
        "--meter-id": meter_id is not None,
        "--timezone": timezone is not None,
        "--ts-format": ts_format is not None,
    }
    given = [name for name, on in readings_only.items() if on]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise InputError(f"{', '.join(given)} {verb} to readings, not with --target")
    notes = err if fmt == "json" else out
    kappa.run(
        settings,
        file,
        target,
        features=None if features is None else features.split(","),
        batch_rows=20 if batch_rows is None else batch_rows,
        shuffle=shuffle,
        seed=seed,
        delimiter=delimiter,
        fmt=fmt,
        emit=lambda line: print(line, flush=True),
        note=lambda text: notes.print(text, markup=False, highlight=False),
    )


@app.command()
def simulate(
    meters: Annotated[int, typer.Option(help="Number of meters.")] = 100,
    days: Annotated[float, typer.Option(help="Days of data (files).")] = 30.0,
    freq: Annotated[str, typer.Option(help="Reading interval: 15min, 30min, 1h.")] = "1h",
    start: Annotated[str, typer.Option(help="First timestamp (UTC).")] = "2024-01-01",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    anomaly_rate: Annotated[float, typer.Option(help="Anomalies per meter per 30 days.")] = 2.0,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write readings (with a label column) here.")
    ] = None,
    truth: Annotated[
        Path | None, typer.Option(help="Write the injected anomalies (ground truth) here.")
    ] = None,
    live: Annotated[bool, typer.Option(help="Publish to the bus step by step instead.")] = False,
    speed: Annotated[float, typer.Option(help="With --live: times real time.")] = 3600.0,
    config: ConfigOpt = None,
) -> None:
    """Simulate a fleet with realistic profiles and labelled injected anomalies.

    Examples:
      meterops simulate --meters 500 --days 90 --out fleet.parquet --truth anomalies.csv
      meterops simulate --meters 50 --live --speed 3600
    """
    from meterops.sources.simulator import (
        FleetSpec,
        FleetStream,
        write_ground_truth,
    )
    from meterops.sources.simulator import (
        simulate as run_simulation,
    )

    step = pd.Timedelta(freq)
    spec = FleetSpec(
        meters=meters,
        start=pd.Timestamp(start, tz="UTC"),
        periods=max(1, int(pd.Timedelta(days=days) / step)),
        freq=freq,
        seed=seed,
        anomaly_rate=anomaly_rate,
    )
    if not live:
        if out_file is None:
            raise InputError("give --out FILE (or --live to publish to the bus)")
        sim = run_simulation(spec)
        frame = sim.readings
        if out_file.suffix == ".parquet":
            frame.to_parquet(out_file, index=False)
        else:
            frame.to_csv(out_file, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
        if truth is not None:
            write_ground_truth(sim, truth)
        out.print(
            f"wrote {len(frame)} readings of {meters} meters to {out_file}; "
            f"{len(sim.anomalies)} anomalies injected"
            + (f" (ground truth: {truth})" if truth else "")
        )
        return
    from meterops.pipeline import Pipeline
    from meterops.types import ReadingBatch

    settings = _settings(config)
    stream = FleetStream(spec)
    interval = step.total_seconds() / speed
    sent = 0
    with Pipeline(settings) as pipe:
        for _ in range(spec.periods):
            frame = stream.next_batch(1).drop(columns=["label"])
            pipe.producer.send("readings", ReadingBatch.from_pandas(frame).table)
            sent += len(frame)
            time.sleep(interval)
    out.print(f"published {sent} simulated readings")


@app.command()
def worker(
    config: ConfigOpt = None,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Process what is waiting, then exit.")
    ] = False,
    batch_rows: Annotated[int | None, typer.Option(help="Micro-batch size.")] = None,
) -> None:
    """Consume readings: validate, score with the champion, store, lake, commit offsets.

    Each valid reading gets a forecast per horizon ([scoring] horizons) with its
    10/50/90 % quantiles and an anomaly score from the registry's champion (a new
    champion is picked up within seconds), and the online model learns from it.
    Several workers with the same config share the partitions.

    Example: meterops worker --until-idle
    """
    from meterops.cli_models import _log_to_stderr
    from meterops.pipeline import BatchStats, Pipeline, WorkerTotals

    _log_to_stderr()
    overrides: dict[str, Any] = {}
    if batch_rows is not None:
        overrides["worker"] = {"batch_rows": batch_rows}
    settings = _settings(config, **overrides)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    last = [0.0]

    def report(stats: BatchStats, totals: WorkerTotals) -> None:
        if time.monotonic() - last[0] >= 5 or until_idle:
            last[0] = time.monotonic()
            err.print(
                f"worker: {totals.rows:,} readings ({totals.rate:,.0f}/s), stored "
                f"{totals.stored:,}, dead letters {totals.deadletters:,}, predictions "
                f"{totals.predictions:,}, anomalies {totals.anomalies:,}"
                + (f" ({stats.model})" if stats.model else "")
            )

    with Pipeline(settings) as pipe:
        try:
            totals = pipe.worker().run(until_idle=until_idle, stop=stop, on_batch=report)
        except KeyboardInterrupt:
            err.print("worker: stopped")
            return
    out.print(
        f"processed {totals.rows} readings: stored {totals.stored}, duplicates "
        f"{totals.duplicates}, dead letters {totals.deadletters}, predictions "
        f"{totals.predictions}, anomalies {totals.anomalies}"
    )


@app.command()
def status(
    config: ConfigOpt = None,
    fmt: FormatOpt = "table",
    watch: Annotated[float | None, typer.Option(help="Refresh every N seconds.")] = None,
) -> None:
    """Counts of readings and dead letters, and the workers' lag.

    Example: meterops status --format json
    """
    from meterops.pipeline import Pipeline

    settings = _settings(config)
    with Pipeline(settings) as pipe:
        while True:
            info = pipe.status()
            if fmt == "json":
                out.print_json(json.dumps(info)) if out.is_terminal else print(json.dumps(info))
            else:
                _print_status(info)
            if watch is None:
                return
            time.sleep(watch)


def _print_status(info: dict[str, Any]) -> None:
    out.print(
        f"readings {info['readings']:,} from {info['meters']:,} meters (last {info['last_ts']}); "
        f"published {info['published']:,}; lag {info['lag']:,}; "
        f"dead letters {info['deadletters']:,}; predictions {info.get('predictions', 0):,}; "
        f"anomalies {info.get('anomalies', 0):,}"
    )
    for reason, count in sorted(info["deadletters_by_reason"].items(), key=lambda kv: -kv[1]):
        out.print(f"  {count:>8,}  {reason}")
    for member, parts in sorted(info.get("workers", {}).items()):
        out.print(f"  worker {member}: {', '.join(parts) or 'no partitions'}")


@deadletters_app.command("list")
def deadletters_list(
    config: ConfigOpt = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest first).")] = 50,
    replayed: Annotated[bool, typer.Option(help="Include replayed ones.")] = False,
    fmt: FormatOpt = "table",
) -> None:
    """List rejected readings with their reasons.

    Example: meterops deadletters list --reason "value out of range" --format json
    """
    from meterops.pipeline import Pipeline

    with Pipeline(_settings(config)) as pipe:
        frame = pipe.store.deadletters(reason=reason, limit=limit, replayed=replayed)
    if fmt == "json":
        print(frame.to_json(orient="records", date_format="iso"))
    elif fmt == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        if frame.empty:
            out.print("no dead letters")
        else:
            cols = ["id", "reason", "meter_id", "ts", "value", "raw", "source", "offset"]
            out.print(frame[cols].to_string(index=False, max_colwidth=40))


@deadletters_app.command("replay")
def deadletters_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead letter ids (default: all).")] = None,
    config: ConfigOpt = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
) -> None:
    """Send dead letters back through validation (e.g. after widening a range).

    Example: meterops deadletters replay --reason "value out of range"; meterops worker --until-idle
    """
    from meterops.pipeline import Pipeline

    with Pipeline(_settings(config)) as pipe:
        sent = pipe.replay_deadletters(ids or None, reason)
    out.print(f"replayed {sent} dead letters into the readings topic")


@app.command()
def up(
    config: ConfigOpt = None,
    meters: Annotated[int, typer.Option(help="Simulated meters.")] = 50,
    replay_speed: Annotated[
        float, typer.Option(help="Real-data replay, times real time (100 h of data per s).")
    ] = 360_000.0,
    sim_speed: Annotated[
        float, typer.Option(help="Simulator, times real time (one hourly step per s).")
    ] = 3_600.0,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C).")
    ] = None,
    profile: ProfileOpt = "default",
) -> None:
    """Start the whole loop: real-data replay, the simulator and a worker.

    Examples:
      meterops up --meters 100 --sim-speed 7200   (Ctrl-C stops everything)
      meterops up --profile scaled                (on Kafka + PostgreSQL started on loopback)
    """
    _check_profile(profile)
    settings = _settings(config)
    cfg = config or (settings.project_dir / CONFIG_NAME)
    if not cfg.exists():
        cfg.write_text(DEFAULT_TOML, encoding="utf-8")
        out.print(f"wrote a default config to {cfg}")
    with contextlib.ExitStack() as stack:
        env = dict(os.environ)
        if profile == "scaled":
            from meterops.services.stack import scaled_stack

            out.print(
                "starting Kafka, PostgreSQL and an MLflow server on 127.0.0.1 "
                "(first time: installing) ..."
            )
            urls = dict(
                stack.enter_context(
                    scaled_stack(settings.project_dir / ".meterops" / "services", tracking=True)
                )
            )
            tracking = urls.pop("tracking_uri")
            env.update({f"METEROPS_BACKENDS__{k.upper()}": v for k, v in urls.items()})
            env["METEROPS_REGISTRY__TRACKING_URI"] = tracking
            registry = settings.registry.model_dump() | {"tracking_uri": tracking}
            settings = _settings(config, backends=urls, registry=registry)
            out.print(
                f"  bus:      {urls['bus']}\n  store:    {redact_url(urls['store'])}\n"
                f"  registry: {tracking}"
            )
        _run_stack(settings, cfg, env, meters, replay_speed, sim_speed, duration)


def _has_champion(settings: Settings) -> bool:
    """Whether the project's registry has a champion (False when it cannot tell)."""
    from meterops.stream import ChampionWatcher

    try:
        return ChampionWatcher(settings).check() is not None
    except MeterOpsError:
        return False


def _run_stack(
    settings: Settings,
    cfg: Path,
    env: dict[str, str],
    meters: int,
    replay_speed: float,
    sim_speed: float,
    duration: float | None,
) -> None:
    """Run worker, replay and simulator as child processes; print status until stopped."""
    from meterops.datasets import data_dir
    from meterops.pipeline import Pipeline

    base = [sys.executable, "-m", "meterops", "--config", str(cfg)]
    real = data_dir() / "uci_household_power_hourly.csv.gz"
    commands = {
        "worker": [*base, "worker"],
        "replay": [
            *base, "replay", str(real), "--meter-id", "uci-household",
            "--timezone", "Europe/Paris", "--speed", str(replay_speed),
        ],
        "simulator": [
            *base, "simulate", "--live", "--meters", str(meters), "--days", "365",
            "--speed", str(sim_speed), "--start", "2024-01-01",
        ],
    }  # fmt: skip
    if not _has_champion(settings):
        # no model yet: train one on simulated history of the same fleet; the worker
        # picks it up when it is promoted (hot reload) and starts scoring
        history = settings.project_dir / ".meterops" / "demo-history.parquet"
        simulate = [
            *base,
            "simulate",
            "--meters",
            str(meters),
            "--days",
            "60",
            "--start",
            "2023-11-02",
            "--out",
            str(history),
        ]
        train = [
            *base,
            "train",
            str(history),
            "--horizon",
            "1",
            "--horizon",
            "24h",
            "--folds",
            "1",
            "--n-estimators",
            "100",
        ]
        commands["trainer"] = ["sh", "-c", f"{shlex.join(simulate)} && {shlex.join(train)}"]
    # the trainer runs two commands through sh: its own process group, stopped as a whole
    procs = {
        name: subprocess.Popen(cmd, env=env, start_new_session=name == "trainer")  # noqa: S603
        for name, cmd in commands.items()
    }
    if "trainer" in procs:
        out.print("no champion yet: training one on 60 days of simulated history ...")
    out.print(
        f"meterops is up: worker, replay of {real.name} and {meters} simulated meters.\n"
        f"  status:       meterops --config {cfg} status   (or: status --watch 2)\n"
        f"  dead letters: meterops --config {cfg} deadletters list\n"
        f"  lake:         {settings.resolve(settings.backends.lake)}/readings (Parquet)\n"
        "Ctrl-C stops everything."
    )
    started = time.monotonic()
    try:
        with Pipeline(settings) as pipe:
            while duration is None or time.monotonic() - started < duration:
                time.sleep(2)
                try:
                    _print_status(pipe.status())
                except BackendError as exc:  # a busy or restarting service: say so, go on
                    err.print(f"status unavailable for now: {exc}")
                if procs["worker"].poll() is not None:
                    raise MeterOpsError("the worker exited; see its output above")
    except KeyboardInterrupt:
        out.print("stopping ...")
    finally:
        for name, proc in procs.items():
            if name == "trainer":
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    out.print("stopped")


@bench_app.command("ingest")
def bench_ingest_cmd(
    rows: Annotated[int, typer.Option(help="Readings to push through.")] = 1_000_000,
    meters: Annotated[int, typer.Option(help="Distinct meters.")] = 1_000,
    profile: ProfileOpt = "default",
    fmt: FormatOpt = "table",
) -> None:
    """Readings/s replay -> bus -> worker -> store + lake, beside the raw ceilings.

    Examples:
      meterops bench ingest --rows 1000000 --format json
      meterops bench ingest --profile scaled     (also Kafka + PostgreSQL, started here)
    """
    from meterops.bench import bench_ingest

    _check_profile(profile)
    err.print(f"bench ingest: {rows:,} readings of {meters:,} meters, profile {profile} ...")
    result = bench_ingest(rows, meters, profile)
    if fmt == "json":
        print(json.dumps(result))
        return
    emb = result["embedded"]
    lines = [
        f"{'run':<58}{'readings/s':>14}",
        f"{'embedded: replay -> local bus -> 1 worker -> SQLite + lake':<58}"
        f"{emb['readings_per_s']:>14,}",
        f"{'  ceiling: bare SQLite keyed inserts, same rows':<58}"
        f"{emb['ceiling_readings_per_s']:>14,}   ratio {emb['ratio']:.2f}",
    ]
    if "scaled" in result:
        sc = result["scaled"]
        lines.append(
            f"{'scaled: replay -> Kafka -> 1 worker -> PostgreSQL + lake':<58}"
            f"{sc['readings_per_s']:>14,}"
        )
        for name, value in sc["ceilings_readings_per_s"].items():
            lines.append(
                f"{'  ceiling: ' + name.replace('_', ' '):<58}{value:>14,}   "
                f"ratio {sc['ratios'][name]:.2f}"
            )
    out.print("\n".join(lines))


@bench_app.command("pipeline")
def bench_pipeline_cmd(
    meters: Annotated[int, typer.Option(help="Simulated meters (hourly).")] = 1000,
    train_days: Annotated[int, typer.Option(help="Days the champion is trained on.")] = 30,
    backlog_days: Annotated[
        int,
        typer.Option(help="Days in each drained backlog (several micro-batches: steady state)."),
    ] = 20,
    rate: Annotated[float, typer.Option(help="Steady readings/s for latency.")] = 10_000.0,
    seconds: Annotated[float, typer.Option(help="Duration of the steady run.")] = 20.0,
    river_rows: Annotated[int, typer.Option(help="Readings River processes.")] = 20_000,
    fmt: FormatOpt = "table",
) -> None:
    """The scoring worker end to end: readings/s, latency, 2 vs 1 workers, vs River.

    Embedded backends in a temporary project; the champion is a GBM (1 step and
    24 h, 10/50/90 % quantiles) trained and promoted here first.

    Examples:
      meterops bench pipeline --format json
      meterops bench pipeline --meters 200 --seconds 10
    """
    from meterops.bench_pipeline import bench_pipeline

    result = bench_pipeline(
        meters=meters,
        train_days=train_days,
        backlog_days=backlog_days,
        rate=rate,
        latency_seconds=seconds,
        river_rows=river_rows,
        progress=lambda text: err.print(f"bench pipeline: {text}", markup=False),
    )
    if fmt == "json":
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:28} {value}")


@bench_app.command("train")
def bench_train_cmd(
    meters: Annotated[int, typer.Option(help="Simulated meters.")] = 1_000,
    days: Annotated[float, typer.Option(help="Days of hourly readings per meter.")] = 365.0,
    test_days: Annotated[
        float, typer.Option(help="Last days held out and forecast day ahead by both.")
    ] = 14.0,
    jobs: Annotated[
        int | None, typer.Option(help="LightGBM threads on both sides (default: all cores).")
    ] = None,
    trees: Annotated[int, typer.Option(help="meterops's cap on boosting rounds.")] = 600,
    fmt: FormatOpt = "table",
) -> None:
    """Train time and peak memory of the global GBM (24 h), beside mlforecast on the same data.

    Examples:
      meterops bench train --format json          (1,000 meters x a year: 8.76 M rows)
      meterops bench train --meters 100 --days 120
    """
    from meterops.bench_train import bench_train

    rows = meters * round(days * 24)
    err.print(f"bench train: {meters:,} meters x {days:g} days ({rows:,} readings) ...")
    result = bench_train(meters, days, test_days=test_days, n_jobs=jobs, n_estimators=trees)
    if fmt == "json":
        print(json.dumps(result))
        return
    ours, peer = result["meterops"], result["peer"]
    lines = [
        f"{'run':<42}{'train s':>10}{'peak MB':>10}{'RMSE':>10}{'cover80':>9}",
        f"{'meterops GBMForecaster (24h, 4 boosters)':<42}{ours['seconds']:>10,.1f}"
        f"{ours['peak_rss_mb']:>10,.0f}{result['rmse']:>10.4f}{result['coverage_80']:>9.3f}",
        f"{'  peer: mlforecast, same features/trees':<42}{peer['seconds']:>10,.1f}"
        f"{peer['peak_rss_mb']:>10,.0f}{result['peer_rmse']:>10.4f}"
        f"{result['peer_coverage_80']:>9.3f}",
        f"ratio {result['ratio']:.2f}; {result['test_points']:,} test points; trees "
        + ", ".join(f"{k} {v}" for k, v in result["trees"].items())
        + f"; target {result['target']['seconds']:.0f} s / {result['target']['peak_rss_mb']:,.0f}"
        f" MB: {'met' if result['within_target'] else 'missed'}",
    ]
    out.print("\n".join(lines))


@app.callback()
def _root(ctx: typer.Context) -> None:
    """MLOps for meter and sensor streams. Every command has --help with an example."""
    del ctx


def main() -> None:
    """Entry point: one clear line and exit code 2 for errors a user can fix."""
    # Pass --config given before the command on to the command.
    argv = sys.argv[1:]
    if len(argv) >= 2 and argv[0] in ("--config", "-c"):
        argv = _move_config(argv)
    try:
        app(args=argv, standalone_mode=True)
    except MeterOpsError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _move_config(argv: list[str]) -> list[str]:
    """``meterops --config X cmd sub ...`` -> ``meterops cmd sub ... --config X``."""
    cfg, rest = argv[:2], argv[2:]
    words = []
    while rest and not rest[0].startswith("-"):
        words.append(rest.pop(0))
        if words[-1] not in ("deadletters", "bench", "models"):
            break
    return [*words, *cfg, *rest]
