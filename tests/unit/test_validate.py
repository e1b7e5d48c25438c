"""Validation rules: each reason is produced where it should be, and only there."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from meterops.settings import ValidationSettings
from meterops.store.base import DUPLICATE_REASON
from meterops.types import RAW, REJECT, ReadingBatch
from meterops.validate import validate

NOW = pd.Timestamp("2024-06-01", tz="UTC")
T0 = pd.Timestamp("2024-05-01", tz="UTC")


def batch(
    rows: list[tuple[str | None, pd.Timestamp | None, float | None]], **extra: list
) -> ReadingBatch:
    table = pa.table(
        {
            "meter_id": pa.array([r[0] for r in rows], pa.string()),
            "ts": pa.array([r[1] for r in rows], pa.timestamp("us", tz="UTC")),
            "value": pa.array([r[2] for r in rows], pa.float64()),
            **{k: pa.array(v) for k, v in extra.items()},
        }
    )
    return ReadingBatch(table)


def reasons(b: ReadingBatch, rules: ValidationSettings | None = None, **kw: object) -> list:
    return validate(b, rules or ValidationSettings(), NOW, **kw).reasons.tolist()


def test_good_rows_pass_untouched() -> None:
    b = batch([("m-1", T0, 1.5), ("a.b:c_d-9", T0, None)])
    result = validate(b, ValidationSettings(), NOW)
    assert result.reasons.tolist() == [None, None]
    assert result.good.table.equals(b.table)
    assert result.good_rows.tolist() == [0, 1]


def test_each_rule_gives_its_reason() -> None:
    rows = [
        (None, T0, 1.0),
        ("  ", T0, 1.0),
        ("bad id!", T0, 1.0),
        ("x" * 129, T0, 1.0),
        ("m", None, 1.0),
        ("m", NOW + pd.Timedelta(days=2), 1.0),
        ("m", pd.Timestamp("1980-01-01", tz="UTC"), 1.0),
        ("m", T0, float("nan")),
        ("m", T0 + pd.Timedelta(hours=1), float("inf")),
        ("m", T0 + pd.Timedelta(hours=2), 1e12),
        ("m", T0 + pd.Timedelta(hours=3), -1e7),
    ]
    assert reasons(batch(rows)) == [
        "missing meter_id",
        "missing meter_id",
        "invalid meter_id",
        "invalid meter_id",
        "missing timestamp",
        "timestamp in the far future",
        "timestamp too old",
        "non-finite value",
        "non-finite value",
        "value out of range",
        "value out of range",
    ]


def test_parser_reasons_win_and_private_columns_are_dropped() -> None:
    b = batch(
        [("m", T0, None), ("m", T0 + pd.Timedelta(hours=1), 2.0)],
        **{REJECT: ["unparseable value", None], RAW: ["m,2024,abc", None]},
    )
    result = validate(b, ValidationSettings(), NOW)
    assert result.reasons.tolist() == ["unparseable value", None]
    assert result.good.table.column_names == ["meter_id", "ts", "value"]


def test_missing_values_can_be_required() -> None:
    b = batch([("m", T0, None)])
    assert reasons(b) == [None]
    assert reasons(b, ValidationSettings(allow_missing_value=False)) == ["missing value"]


def test_covariates_are_checked() -> None:
    b = batch(
        [("m", T0 + pd.Timedelta(hours=i), 1.0) for i in range(3)],
        temperature=[20.0, float("inf"), 1e9],
    )
    assert reasons(b) == [
        None,
        "non-finite covariate temperature",
        "covariate temperature out of range",
    ]


def test_registration_when_required() -> None:
    b = batch([("known", T0, 1.0), ("stranger", T0, 1.0)])
    rules = ValidationSettings(require_registration=True)
    assert reasons(b, rules, registered={"known"}) == [None, "unknown meter"]
    assert reasons(b, ValidationSettings(), registered=set()) == [None, None]


def test_repeats_in_a_batch_same_value_dropped_other_value_rejected() -> None:
    b = batch([("m", T0, 1.0), ("m", T0, 1.0), ("m", T0, 2.0), ("n", T0, None), ("n", T0, None)])
    result = validate(b, ValidationSettings(), NOW)
    assert result.reasons.tolist() == [None, None, DUPLICATE_REASON, None, None]
    assert result.duplicates == 2
    assert result.good_rows.tolist() == [0, 3]
    assert result.rejected_rows.tolist() == [2]


def test_empty_batch() -> None:
    result = validate(ReadingBatch.empty(), ValidationSettings(), NOW)
    assert len(result.good) == 0 and result.duplicates == 0


def test_dead_letters_escape_nul_characters() -> None:
    import numpy as np

    from meterops.types import deadletter_table

    b = batch([("m\x00x", T0, 1.0)], **{RAW: ["m\x00x,2024,1"]})
    table = deadletter_table(b, np.array(["invalid meter_id"]), np.array(["r/0"]), np.array([3]))
    assert table.column("meter_id").to_pylist() == ["m\\x00x"]
    assert table.column("raw").to_pylist() == ["m\\x00x,2024,1"]
