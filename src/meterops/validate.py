"""Pure validation rules: a batch in, good rows and rejected rows with reasons out.

Rules run as whole-column operations in a fixed order; a row carries the
reason of the first rule it breaks. Reasons are short fixed phrases so they
group well in ``status`` and metrics:

===============================  =================================================
reason                           when
===============================  =================================================
(parser reasons)                 set by the file reader (unparseable value, ...)
missing meter_id                 null or empty meter id
invalid meter_id                 not 1-128 chars of ``[A-Za-z0-9._:-]``
missing timestamp                null timestamp
timestamp in the far future      later than now + ``max_future``
timestamp too old                earlier than ``min_ts``
missing value                    null value while ``allow_missing_value`` is off
non-finite value                 NaN or +-inf
value out of range               outside [``value_min``, ``value_max``]
non-finite covariate <name>      NaN or +-inf in a covariate
covariate <name> out of range    outside [``covariate_min``, ``covariate_max``]
unknown meter                    not registered while registration is required
duplicate with a different value same (meter, ts) earlier in the batch, other value
===============================  =================================================

Repeats of a reading with the same value are not errors: they are dropped
and counted as duplicates (the same reading sent twice is stored once).
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from meterops.settings import ValidationSettings, parse_duration
from meterops.store.base import DUPLICATE_REASON
from meterops.types import REJECT, ReadingBatch

__all__ = ["METER_ID_PATTERN", "Validated", "validate"]

METER_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


@dataclass(frozen=True)
class Validated:
    """Outcome of :func:`validate` for one batch of ``n`` input rows.

    ``good`` holds the accepted rows (no private columns, unique keys) and
    ``good_rows`` their positions in the input; ``reasons`` is aligned with
    the input (None where accepted or an identical repeat).
    """

    good: ReadingBatch
    good_rows: np.ndarray
    reasons: np.ndarray
    duplicates: int

    @property
    def rejected_rows(self) -> np.ndarray:
        return np.flatnonzero(pd.notna(self.reasons))


def _mask(array: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Boolean numpy mask from an Arrow boolean array (null counts as False)."""
    return np.asarray(pc.fill_null(array, False), dtype=bool)


def validate(
    batch: ReadingBatch,
    rules: ValidationSettings,
    now: pd.Timestamp,
    registered: Set[str] | None = None,
) -> Validated:
    """Apply the rules of the module docstring to ``batch`` as of ``now`` (UTC)."""
    t = batch.table
    n = t.num_rows
    reasons = np.full(n, None, dtype=object)

    def reject(mask: np.ndarray, reason: str) -> None:
        reasons[mask & pd.isna(reasons)] = reason

    if REJECT in t.column_names:
        parser = t.column(REJECT).to_numpy(zero_copy_only=False)
        reasons[:] = parser
    meter = t.column("meter_id")
    empty = _mask(pc.or_kleene(pc.is_null(meter), pc.equal(pc.utf8_trim_whitespace(meter), "")))
    reject(empty, "missing meter_id")
    reject(~_mask(pc.match_substring_regex(meter, METER_ID_PATTERN)), "invalid meter_id")

    ts = t.column("ts")
    ts_us = pc.cast(ts, pa.int64())
    reject(_mask(pc.is_null(ts)), "missing timestamp")
    future = int((now + parse_duration(rules.max_future)).value // 1000)
    reject(_mask(pc.greater(ts_us, future)), "timestamp in the far future")
    oldest = int(pd.Timestamp(rules.min_ts, tz="UTC").value // 1000)
    reject(_mask(pc.less(ts_us, oldest)), "timestamp too old")

    value = t.column("value")
    if not rules.allow_missing_value:
        reject(_mask(pc.is_null(value)), "missing value")
    reject(~_mask(pc.is_finite(value)) & ~_mask(pc.is_null(value)), "non-finite value")
    out_of_range = pc.or_kleene(pc.less(value, rules.value_min), pc.greater(value, rules.value_max))
    reject(_mask(out_of_range), "value out of range")

    for name in batch.covariates:
        col = t.column(name)
        reject(~_mask(pc.is_finite(col)) & ~_mask(pc.is_null(col)), f"non-finite covariate {name}")
        bad = pc.or_kleene(pc.less(col, rules.covariate_min), pc.greater(col, rules.covariate_max))
        reject(_mask(bad), f"covariate {name} out of range")

    if rules.require_registration:
        known = pa.array(sorted(registered or ()), pa.string())
        reject(~_mask(pc.is_in(meter, value_set=known)), "unknown meter")

    ok = np.flatnonzero(pd.isna(reasons))
    duplicates = 0
    if len(ok):
        keys = pd.DataFrame(
            {
                "m": t.column("meter_id").take(ok).to_numpy(zero_copy_only=False),
                "t": ts_us.take(ok).to_numpy(zero_copy_only=False),
            }
        )
        repeated = keys.duplicated(keep="first").to_numpy()
        if repeated.any():
            values = pd.Series(value.take(ok).to_numpy(zero_copy_only=False))
            first = values.groupby([keys["m"], keys["t"]], sort=False).transform("first")
            same = (values == first) | (values.isna() & first.isna())
            conflict = repeated & ~same.to_numpy()
            reasons[ok[conflict]] = DUPLICATE_REASON
            duplicates = int((repeated & same.to_numpy()).sum())
            ok = ok[~repeated]
    good = batch.clean().take(pa.array(ok, pa.int64()))
    return Validated(good=good, good_rows=ok, reasons=reasons, duplicates=duplicates)
