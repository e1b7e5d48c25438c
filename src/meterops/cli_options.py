"""Typer option types shared by every command, so a flag means the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meterops.settings import CONFIG_NAME

__all__ = [
    "ConfigOpt",
    "Delim",
    "FormatOpt",
    "HolidaysOpt",
    "MeterCol",
    "MeterId",
    "TsCol",
    "TsFormat",
    "Tz",
    "ValueCol",
]

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"Project config (default: ./{CONFIG_NAME})."),
]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table or json.")]
HolidaysOpt = Annotated[
    str | None, typer.Option("--holidays", help="Public-holiday country code, e.g. FR.")
]
MeterCol = Annotated[str, typer.Option("--meter-col", help="Column holding the meter id.")]
TsCol = Annotated[str, typer.Option("--ts-col", help="Column holding the timestamp.")]
ValueCol = Annotated[str, typer.Option("--value-col", help="Column holding the value.")]
MeterId = Annotated[
    str | None, typer.Option("--meter-id", help="Meter id for a single-series file.")
]
Tz = Annotated[
    str | None,
    typer.Option("--timezone", help="Zone of naive timestamps (default: config)."),
]
Delim = Annotated[str | None, typer.Option("--delimiter", help="CSV delimiter (default: sniff).")]
TsFormat = Annotated[
    str | None, typer.Option("--ts-format", help="strftime format, e.g. '%d/%m/%Y %H:%M:%S'.")
]
