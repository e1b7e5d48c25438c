"""Reading meter files: formats, mapping, time zones, covariates and garbage rows."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from meterops.errors import ConfigError, InputError
from meterops.sources.files import FileFormat, iter_file, read_file
from meterops.types import RAW, REJECT, TS_TYPE, ReadingBatch, schema_for


def write(directory: Path, name: str, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8) to ``directory/name`` and return the path."""
    path = directory / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


CLEAN = (
    "meter_id,ts,value\n"
    "m1,2024-01-01T00:00:00Z,1.5\n"
    "m1,2024-01-01T01:00:00Z,2.5\n"
    "m2,2024-01-01T00:00:00Z,-3\n"
)


def assert_clean(batch: ReadingBatch) -> None:
    assert batch.table.schema == schema_for(batch.covariates)
    assert not batch.has_rejects


# ------------------------------------------------------------------ formats


def test_clean_csv(tmp_path: Path) -> None:
    batch, summary = read_file(write(tmp_path, "r.csv", CLEAN), FileFormat())
    assert_clean(batch)
    frame = batch.to_pandas()
    assert frame["meter_id"].tolist() == ["m1", "m1", "m2"]
    hours = ["2024-01-01T00:00Z", "2024-01-01T01:00Z", "2024-01-01T00:00Z"]
    assert frame["ts"].tolist() == [utc(h) for h in hours]
    assert frame["value"].tolist() == [1.5, 2.5, -3.0]
    assert (summary.rows, summary.rejected, summary.meters) == (3, 0, 2)
    assert summary.rejected_by_reason == {}
    assert summary.ts_min == utc("2024-01-01T00:00Z")
    assert summary.ts_max == utc("2024-01-01T01:00Z")


def test_csv_gz_is_found_by_magic_bytes(tmp_path: Path) -> None:
    for name in ("r.csv.gz", "r.data"):
        batch, summary = read_file(write(tmp_path, name, gzip.compress(CLEAN.encode())))
        assert_clean(batch)
        assert summary.rows == 3
        assert batch.to_pandas()["value"].tolist() == [1.5, 2.5, -3.0]


def test_parquet_with_types_and_zones(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "meter_id": pd.Series(["a", "b", "a"], dtype="category"),
            "ts": pd.to_datetime(["2024-01-01 01:00", "2024-01-01 02:00", None]).tz_localize(
                "Europe/Paris"
            ),
            "value": np.array([1, 2, 3], dtype=np.int32),
            "temperature": [10.5, np.nan, 12.0],
            "label": [0, 1, 0],
        }
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    index = table.column_names.index("temperature")  # pandas would write NaN as null
    table = table.set_column(index, "temperature", pa.array([10.5, math.nan, 12.0]))
    path = tmp_path / "r.parquet"
    pq.write_table(table, path)
    batch, summary = read_file(path, FileFormat())
    assert batch.covariates == ("temperature",)
    table = batch.table
    assert table.schema.field("ts").type == TS_TYPE
    assert table.column("ts").to_pylist()[:2] == [
        utc("2024-01-01T00:00Z").to_pydatetime(),
        utc("2024-01-01T01:00Z").to_pydatetime(),
    ]
    assert table.column("value").to_pylist() == [1.0, 2.0, 3.0]
    assert table.column("temperature").null_count == 0  # NaN is kept as NaN
    assert table.column(REJECT).to_pylist() == [None, None, "missing timestamp"]
    assert table.column(RAW).to_pylist()[2].startswith("a,")
    assert summary.rejected_by_reason == {"missing timestamp": 1}


def test_parquet_naive_epoch_and_text_columns(tmp_path: Path) -> None:
    naive = pa.table(
        {
            "meter_id": ["a", "a"],
            "ts": pa.array([pd.Timestamp("2024-07-01 12:00"), pd.Timestamp("2024-07-01 13:00")]),
            "value": ["1.5", "oops"],
        }
    )
    pq.write_table(naive, tmp_path / "naive.parquet")
    batch, _ = read_file(tmp_path / "naive.parquet", FileFormat(timezone="Europe/Berlin"))
    table = batch.table
    assert table.column("ts").to_pylist()[0] == utc("2024-07-01T10:00Z").to_pydatetime()
    assert table.column("value").to_pylist() == [1.5, None]
    assert table.column(REJECT).to_pylist() == [None, "unparseable value"]
    assert "oops" in table.column(RAW).to_pylist()[1]

    epoch = pa.table({"ts": [1_704_067_200, 1_704_070_800], "value": [1.0, 2.0]})
    pq.write_table(epoch, tmp_path / "epoch.parquet")
    batch, _ = read_file(tmp_path / "epoch.parquet", FileFormat(meter_id="x"))
    assert batch.to_pandas()["ts"].tolist() == [utc("2024-01-01T00:00Z"), utc("2024-01-01T01:00Z")]
    assert batch.to_pandas()["meter_id"].tolist() == ["x", "x"]


def test_parquet_streams_in_batches(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "meter_id": ["m"] * 10,
            "ts": pd.date_range("2024-01-01", periods=10, freq="h", tz="UTC"),
            "value": np.arange(10.0),
        }
    )
    path = tmp_path / "r.parquet"
    frame.to_parquet(path, row_group_size=4)
    batches = list(iter_file(path, FileFormat(), chunk_rows=3))
    assert sum(len(b) for b in batches) == 10
    assert max(len(b) for b in batches) <= 3
    assert ReadingBatch.concat(batches).to_pandas()["value"].tolist() == list(np.arange(10.0))


def test_iter_csv_slices_and_keeps_private_columns_only_where_needed(tmp_path: Path) -> None:
    text = CLEAN + "m3,2024-01-01T00:00:00Z,bad\n"
    batches = list(iter_file(write(tmp_path, "r.csv", text), FileFormat(), chunk_rows=2))
    assert [len(b) for b in batches] == [2, 2]
    assert [b.has_rejects for b in batches] == [False, True]
    with pytest.raises(ConfigError):
        next(iter_file(tmp_path / "r.csv", FileFormat(), chunk_rows=0))


# ------------------------------------------------------------------ mapping and layout


def test_column_mapping_and_sniffed_delimiter(tmp_path: Path) -> None:
    text = "id;time;kwh;outdoor\nA;2024-01-01 00:00;1,5;3\nB;2024-01-01 00:00;2;4\n"
    fmt = FileFormat(meter_col="id", ts_col="time", value_col="kwh")
    batch, _ = read_file(write(tmp_path, "r.csv", text), fmt)
    frame = batch.to_pandas()
    assert frame.columns.tolist() == ["meter_id", "ts", "value", "outdoor"]
    assert frame["meter_id"].tolist() == ["A", "B"]
    assert frame["value"].tolist() == [1.5, 2.0]  # a decimal comma beside a ';' delimiter


@pytest.mark.parametrize("delimiter", ["\t", "|", ";"])
def test_other_delimiters(tmp_path: Path, delimiter: str) -> None:
    text = CLEAN.replace(",", delimiter)
    batch, _ = read_file(write(tmp_path, "r.txt", text), FileFormat())
    assert batch.to_pandas()["value"].tolist() == [1.5, 2.5, -3.0]
    explicit, _ = read_file(tmp_path / "r.txt", FileFormat(delimiter=delimiter))
    assert explicit.table.equals(batch.table)


def test_bom_crlf_quotes_and_padded_header(tmp_path: Path) -> None:
    text = '\ufeff meter_id , "ts" ,value\r\n"m1",2024-01-01T00:00Z,"7"\r\n'
    batch, _ = read_file(write(tmp_path, "r.csv", text), FileFormat())
    assert batch.to_pandas()[["meter_id", "value"]].values.tolist() == [["m1", 7.0]]


def test_single_series_takes_the_file_stem_or_the_given_id(tmp_path: Path) -> None:
    text = "ts,value\n2024-01-01T00:00Z,1\n2024-01-01T01:00Z,2\n"
    path = write(tmp_path, "house 1 (kitchen).csv.gz", gzip.compress(text.encode()))
    batch, summary = read_file(path, FileFormat())
    assert set(batch.to_pandas()["meter_id"]) == {"house_1_kitchen"}
    assert summary.meters == 1
    batch, _ = read_file(path, FileFormat(meter_id="kitchen"))
    assert set(batch.to_pandas()["meter_id"]) == {"kitchen"}


def test_header_only_file_is_an_empty_batch(tmp_path: Path) -> None:
    batch, summary = read_file(write(tmp_path, "r.csv", "meter_id,ts,value\n"), FileFormat())
    assert len(batch) == 0
    assert summary.rows == 0
    assert summary.ts_min is None


def test_covariates_detection(tmp_path: Path) -> None:
    text = (
        "meter_id,ts,value,temperature,label,site,humidity,empty\n"
        "m1,2024-01-01T00:00Z,1,20.5,1,north,40,\n"
        "m1,2024-01-01T01:00Z,2,21,0,north,nan,\n"
    )
    path = write(tmp_path, "r.csv", text)
    batch, _ = read_file(path, FileFormat())
    assert batch.covariates == ("temperature", "humidity")
    assert batch.table.schema == schema_for(("temperature", "humidity"))
    humidity = batch.table.column("humidity")
    assert humidity.null_count == 0
    assert math.isnan(humidity.to_pylist()[1])
    chosen, _ = read_file(path, FileFormat(covariates=("humidity",)))
    assert chosen.covariates == ("humidity",)
    none, _ = read_file(path, FileFormat(covariates=()))
    assert none.covariates == ()
    with pytest.raises(ConfigError, match="label"):
        FileFormat(covariates=("label",))


# ------------------------------------------------------------------ time


def test_offsets_and_iso_variants_become_utc(tmp_path: Path) -> None:
    text = (
        "meter_id,ts,value\n"
        "m,2024-01-01T00:00:00+02:00,1\n"
        "m,2024-01-01T00:00Z,2\n"
        "m,2024-01-01 00:00,3\n"
        "m,2024-01-01T00:00:00.250-05:00,4\n"
        "m,2024-01-01,5\n"
    )
    batch, summary = read_file(write(tmp_path, "r.csv", text), FileFormat(timezone="Asia/Tokyo"))
    assert summary.rejected == 0
    assert batch.to_pandas()["ts"].tolist() == [
        utc("2023-12-31T22:00Z"),
        utc("2024-01-01T00:00Z"),
        utc("2023-12-31T15:00Z"),  # naive: Tokyo wall time
        utc("2024-01-01T05:00:00.250Z"),
        utc("2023-12-31T15:00Z"),
    ]


@pytest.mark.parametrize("zoned", [False, True])
def test_naive_times_take_the_zone_with_dst_rules(tmp_path: Path, zoned: bool) -> None:
    rows = ["2024-03-31 02:30", "2024-10-27 02:30", "2024-07-01 12:00"]
    if zoned:  # one offset row sends the column down the text path: same answers
        rows.append("2024-07-01T12:00+00:00")
    text = "meter_id,ts,value\n" + "".join(f"m,{r},1\n" for r in rows)
    batch, _ = read_file(write(tmp_path, "r.csv", text), FileFormat(timezone="Europe/Berlin"))
    got = batch.to_pandas()["ts"].tolist()
    assert got[:3] == [
        utc("2024-03-31T01:00Z"),  # nonexistent 02:30 shifts forward to 03:00 CEST
        utc("2024-10-27T00:30Z"),  # ambiguous 02:30 takes the first (CEST) occurrence
        utc("2024-07-01T10:00Z"),
    ]


def test_epoch_seconds_when_the_column_is_numeric(tmp_path: Path) -> None:
    text = "meter_id,ts,value\nm,1704067200,1\nm,1704070800.5,2\nm,,3\n"
    batch, summary = read_file(write(tmp_path, "r.csv", text), FileFormat())
    assert batch.table.column("ts").to_pylist()[:2] == [
        utc("2024-01-01T00:00Z").to_pydatetime(),
        utc("2024-01-01T01:00:00.5Z").to_pydatetime(),
    ]
    assert summary.rejected_by_reason == {"missing timestamp": 1}


def test_uci_day_first_times(tmp_path: Path) -> None:
    text = (
        "Date_Time;Global_active_power;Voltage\n"
        "16/12/2006 17:24:00;4.216;234.84\n"
        "01/02/2007 00:00:00;?;233.63\n"
    )
    path = write(tmp_path, "household_power.csv", text)
    expected = [utc("2006-12-16T17:24Z"), utc("2007-02-01T00:00Z")]
    for fmt in (
        FileFormat(ts_col="Date_Time", value_col="Global_active_power", dayfirst=True),
        FileFormat(
            ts_col="Date_Time", value_col="Global_active_power", ts_format="%d/%m/%Y %H:%M:%S"
        ),
    ):
        batch, summary = read_file(path, fmt)
        frame = batch.to_pandas()
        assert summary.rejected == 0
        assert frame["ts"].tolist() == expected
        assert frame["meter_id"].tolist() == ["household_power"] * 2
        assert frame["value"].isna().tolist() == [False, True]  # '?' is a missing value
        assert batch.covariates == ("Voltage",)


# ------------------------------------------------------------------ garbage


GARBAGE = (
    b"meter_id,ts,value,temperature\n"
    b"m1,2024-01-01T00:00:00Z,1.5,20\n"  # 0 good
    b"m1,2024-01-01T01:00:00Z,abc,20\n"  # 1 text in value
    b"m1,not-a-date,2.0,20\n"  # 2 bad timestamp
    b"m1,,3.0,20\n"  # 3 missing timestamp
    b"m1,2024-01-01T02:00:00Z,nan,20\n"  # 4 NaN (validation's business)
    b"m1,2024-01-01T03:00:00Z,inf,20\n"  # 5 inf
    b"m1,2024-01-01T04:00:00Z,-inf,\n"  # 6 -inf, missing covariate
    b",2024-01-01T05:00:00Z,4.0,20\n"  # 7 empty meter id
    b"   ,2024-01-01T05:00:00Z,4.0,20\n"  # 8 blank meter id
    b"m1,2024-01-01T06:00:00Z,1e12,20\n"  # 9 out of range: validation's business
    b"\xff\xfe\x00garbage\n"  # 10 binary junk
    b"m1;2024-01-01T07:00:00Z;5.0;20\n"  # 11 wrong delimiter
    b"\n  \n\n"  # blank lines are not rows
    b"m1,2024-01-01T08:00:00Z,,20\n"  # 12 empty value: missing, accepted
    b"m1,2024-01-01T09:00:00Z,6.0,hot\n"  # 13 text in a covariate
    b"m\xff2,2024-01-01T10:00:00Z,7.0,20\n"  # 14 junk inside a field
    b"  m2 , 2024-01-01T11:00:00+02:00 , 8.0 ,21\n"  # 15 padded fields
    b"bad id!,2024-01-01T12:00:00Z,9,22,extra\n"  # 16 too many fields
    b"bad id!,2024-01-01T12:00:00Z,9,22\n"  # 17 bad characters: validation's business
)

EXPECTED_REASONS = [
    None,
    "unparseable value",
    "unparseable timestamp",
    "missing timestamp",
    None,
    None,
    None,
    "missing meter_id",
    "missing meter_id",
    None,
    "invalid encoding",
    "wrong column count",
    None,
    "unparseable covariate temperature",
    "invalid encoding",
    None,
    "wrong column count",
    None,
]


@pytest.mark.parametrize("compress", [False, True])
def test_garbage_rows_are_all_accounted_for(tmp_path: Path, compress: bool) -> None:
    content = gzip.compress(GARBAGE) if compress else GARBAGE
    batch, summary = read_file(write(tmp_path, "g.csv", content), FileFormat())
    table = batch.table
    assert table.column_names == ["meter_id", "ts", "value", "temperature", REJECT, RAW]
    assert table.column(REJECT).to_pylist() == EXPECTED_REASONS
    assert summary.rows == len(EXPECTED_REASONS)
    assert summary.rejected == 10
    assert summary.rejected_by_reason == {
        "invalid encoding": 2,
        "missing meter_id": 2,
        "missing timestamp": 1,
        "unparseable covariate temperature": 1,
        "unparseable timestamp": 1,
        "unparseable value": 1,
        "wrong column count": 2,
    }

    value = table.column("value")
    assert pc.is_nan(value).to_pylist()[4] is True  # NaN stays NaN ...
    assert value.is_null().to_pylist()[4] is False  # ... and is not null
    assert value.to_pylist()[5:7] == [math.inf, -math.inf]
    assert value.to_pylist()[9] == 1e12
    assert value.is_null().to_pylist()[12] is True  # an empty value is missing
    assert value.to_pylist()[1] is None  # unparseable -> null, the rest kept
    assert table.column("ts").to_pylist()[1] == utc("2024-01-01T01:00Z").to_pydatetime()
    assert table.column("ts").null_count == 5  # rows 2 and 3, and the three unsplit rows
    assert table.column("temperature").to_pylist()[13] is None

    meters = table.column("meter_id").to_pylist()
    assert meters[15] == "m2"
    assert meters[17] == "bad id!"
    assert meters[7] is None and meters[8] is None
    assert table.column("ts").to_pylist()[15] == utc("2024-01-01T09:00Z").to_pydatetime()
    assert table.column("value").to_pylist()[15] == 8.0

    raw = table.column(RAW).to_pylist()
    assert raw[1] == "m1,2024-01-01T01:00:00Z,abc,20"
    assert raw[11] == "m1;2024-01-01T07:00:00Z;5.0;20"
    assert raw[16] == "bad id!,2024-01-01T12:00:00Z,9,22,extra"
    assert "garbage" in raw[10]
    assert [r is None for r in raw] == [r is None for r in EXPECTED_REASONS]
    unsplit = [10, 11, 16]
    for name in ("meter_id", "ts", "value", "temperature"):
        assert all(table.column(name).to_pylist()[i] is None for i in unsplit)


def test_unbalanced_quote_does_not_swallow_rows(tmp_path: Path) -> None:
    text = 'meter_id,ts,value\nm1,2024-01-01T00:00Z,"1\nm1,2024-01-01T01:00Z,2\n'
    batch, summary = read_file(write(tmp_path, "r.csv", text), FileFormat())
    assert summary.rows == 2
    assert batch.table.column("value").to_pylist()[1] == 2.0


def test_null_markers_are_missing_values(tmp_path: Path) -> None:
    text = (
        "meter_id,ts,value\n"
        "m,2024-01-01T00:00Z,NA\n"
        "m,2024-01-01T01:00Z,null\n"
        "NA,2024-01-01T02:00Z,1\n"
    )
    batch, summary = read_file(write(tmp_path, "r.csv", text), FileFormat())
    assert summary.rejected == 0
    assert batch.table.column("value").null_count == 2
    assert batch.table.column("meter_id").to_pylist()[2] == "NA"


# ------------------------------------------------------------------ unreadable inputs


def test_missing_columns_name_the_file_what_was_found_and_the_options(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", "id,time,kwh\na,2024-01-01T00:00Z,1\n")
    with pytest.raises(InputError) as info:
        read_file(path, FileFormat())
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for part in ("'ts'", "'value'", "'id'", "'time'", "'kwh'", "--ts-col", "--value-col"):
        assert part in message
    with pytest.raises(InputError, match="'rain'"):
        read_file(path, FileFormat(ts_col="time", value_col="kwh", covariates=("rain",)))


def test_not_a_table_with_a_parquet_magic_or_binary_header(tmp_path: Path) -> None:
    cases = {
        "corrupt.parquet": b"PAR1" + b"\x00garbage" * 10,
        "image.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        "archive.zip": b"PK\x03\x04" + b"\x00" * 20,
        "broken.csv.gz": b"\x1f\x8b\x08\x00garbage",
        "empty.csv": b"",
        "blank.csv": b"\n  \n",
        "prose.txt": b"hello world\nthis is not a table\n",
    }
    for name, content in cases.items():
        path = write(tmp_path, name, content)
        with pytest.raises(InputError) as info:
            read_file(path, FileFormat())
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_file(tmp_path / "nope.csv", FileFormat())
    with pytest.raises(InputError, match="directory"):
        read_file(tmp_path, FileFormat())
    with pytest.raises(InputError, match="no such file"):
        next(iter_file(tmp_path / "nope.parquet", FileFormat()))


def test_bad_format_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="time zone"):
        FileFormat(timezone="Mars/Olympus")
    with pytest.raises(ConfigError, match="delimiter"):
        FileFormat(delimiter=";;")
    with pytest.raises(ConfigError):
        FileFormat(ts_col="value")
