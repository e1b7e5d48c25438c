"""The Kappa-stream scenario for tabular data: replay a table, learn online, score per batch.

``meterops replay FILE --target COLUMN`` runs it: the rows of a tabular file
(features plus a numeric target, no time index) are published to the bus
topic :data:`TABULAR` in micro-batch-sized messages, consumed back through a
consumer group, and an online regressor is scored *prequentially*: every
micro-batch is first predicted with the model as it stood before the batch,
scored, and only then learned from. A baseline (the running mean of the
targets seen so far) is scored the same way, so the output shows whether the
model learns anything the mean does not.

The pieces, in the order a row meets them:

* :func:`read_table` -- CSV, CSV.gz or Parquet into a frame; a file that
  cannot be used raises :class:`~meterops.errors.InputError` naming it.
* :class:`TabularSpec` -- which columns are the target, numeric features and
  categorical features (checked against the file, with clear errors).
* :func:`stream_table` -- the Arrow table that goes on the bus: the stream key
  in ``meter_id`` (one key per run, so the run lands in one partition and
  keeps its order), the row's position in ``_row``, then the spec's columns.
* :class:`TabularEncoder` -- numeric columns as they are, categorical ones
  one-hot with a vocabulary that grows as new values arrive (at most
  ``max_categories`` per column; later newcomers encode as all zeros).
* :class:`OnlineRidge` -- ridge regression on running-standardised features,
  re-solved exactly after every batch from running sufficient statistics.
* :func:`prequential` -- predict, score, learn, per micro-batch, yielding a
  :class:`BatchScore`; :func:`replay` runs it over the bus.

Every step is vectorised over the rows of a micro-batch (NumPy / Arrow); no
Python call runs once per row.

>>> import numpy as np, pandas as pd
>>> rng = np.random.default_rng(0)
>>> frame = pd.DataFrame({"x": rng.normal(size=200), "kind": rng.choice(["a", "b"], 200)})
>>> frame["y"] = 3 * frame["x"] + np.where(frame["kind"] == "a", 5.0, -5.0)
>>> spec = TabularSpec.infer(frame, "y")
>>> spec.numeric, spec.categorical
(('x',), ('kind',))
>>> scores = list(prequential([frame[i : i + 50] for i in range(0, 200, 50)], spec))
>>> [s.n for s in scores], scores[0].rmse is None
([50, 50, 50, 50], True)
>>> round(scores[-1].cum_rmse, 2), round(scores[-1].baseline_cum_rmse, 2)
(0.05, 5.9)
"""

from __future__ import annotations

import gzip
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from meterops.errors import BackendError, ConfigError, InputError

if TYPE_CHECKING:
    from meterops.bus.base import Consumer
    from meterops.pipeline import Pipeline
    from meterops.settings import Settings

__all__ = [
    "KEY",
    "ROW",
    "TABULAR",
    "BatchScore",
    "OnlineRidge",
    "RunningMean",
    "TabularEncoder",
    "TabularSpec",
    "prequential",
    "read_table",
    "replay",
    "run",
    "stream_table",
]

Floats = npt.NDArray[np.float64]

#: The bus topic tabular rows travel on (created on first use, like the others).
TABULAR = "tabular"
#: Stream key column (the bus partitions by it): one value per run.
KEY = "meter_id"
#: Position of the row in the stream (file order, or the shuffled order).
ROW = "_row"
_RESERVED = (KEY, ROW)
_DELIMITERS = (",", ";", "\t", "|")
_IDLE_TIMEOUT = 60.0  # seconds without a new row before a replay gives up


# -- reading and checking the file ----------------------------------------------


def read_table(path: Path, delimiter: str | None = None) -> pd.DataFrame:
    """The rows of a CSV, CSV.gz or Parquet file (format found by magic bytes).

    CSV delimiters are sniffed from the header line (``,``, ``;``, tab, ``|``)
    unless given. Raises :class:`InputError` for a missing, unreadable or
    empty file and for a file with a header but no rows.
    """
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a CSV, CSV.gz or Parquet file")
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from exc
    if not head:
        raise InputError(f"{path}: the file is empty")
    try:
        if head == b"PAR1":
            frame = pd.read_parquet(path)
        else:
            compression: Literal["gzip"] | None = "gzip" if head[:2] == b"\x1f\x8b" else None
            sep = delimiter or _sniff(path, compression)
            frame = pd.read_csv(
                path, sep=sep, compression=compression, skipinitialspace=True, low_memory=False
            )
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{path}: the file is empty") from exc
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        message = " ".join(str(exc).split())
        raise InputError(f"{path}: cannot be read as a table ({message})") from exc
    if frame.empty:
        raise InputError(f"{path}: no data rows (only a header)")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _sniff(path: Path, compression: str | None) -> str:
    """The delimiter that splits the header line into the most fields (comma on a tie)."""
    opener: Callable[..., Any] = gzip.open if compression == "gzip" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        header = fh.readline()
    return max(_DELIMITERS, key=lambda d: (header.count(d), d == ","))


@dataclass(frozen=True)
class TabularSpec:
    """Which columns feed the model: ``target``, ``numeric`` and ``categorical`` features.

    ``ignored`` lists the columns :meth:`infer` left out by itself (text
    columns with more distinct values than ``max_categories``: identifiers,
    free text), so the CLI can say so.
    """

    target: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    ignored: tuple[str, ...] = ()

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    @classmethod
    def infer(
        cls,
        frame: pd.DataFrame,
        target: str,
        features: Sequence[str] | None = None,
        max_categories: int = 50,
    ) -> TabularSpec:
        """The spec for ``frame``: numeric columns are numeric features, the rest categorical.

        Without ``features``, every column but the target is a feature, except
        text columns with more than ``max_categories`` distinct values. Raises
        :class:`InputError` for an unknown or non-numeric target, a feature
        that is not a column, or a column name the stream reserves.
        """
        columns = [str(c) for c in frame.columns]
        if target not in columns:
            raise InputError(f"no target column {target!r}; the columns are: {', '.join(columns)}")
        _numeric_target(frame[target], target)
        if features is None:
            chosen = [c for c in columns if c != target]
        else:
            chosen = list(dict.fromkeys(f.strip() for f in features if f.strip()))
            if not chosen:
                raise InputError("--features names no column")
            missing = [c for c in chosen if c not in columns]
            if missing:
                raise InputError(
                    f"--features names missing column(s) {', '.join(map(repr, missing))}; "
                    f"the columns are: {', '.join(columns)}"
                )
            if target in chosen:
                raise InputError(f"the target {target!r} cannot also be a feature")
        reserved = [c for c in (*chosen, target) if c in _RESERVED]
        if reserved:
            raise InputError(
                f"column name(s) {', '.join(reserved)} are reserved by the stream; "
                "leave them out with --features or rename them"
            )
        numeric, categorical, ignored = [], [], []
        for name in chosen:
            column = frame[name]
            if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
                numeric.append(name)
            elif features is None and column.nunique(dropna=True) > max_categories:
                ignored.append(name)
            else:
                categorical.append(name)
        if not numeric and not categorical:
            raise InputError(
                "no usable feature column (all were left out: "
                f"{', '.join(ignored) or 'none'}); choose some with --features"
            )
        return cls(target, tuple(numeric), tuple(categorical), tuple(ignored))


def _numeric_target(column: pd.Series[Any], name: str) -> None:
    """Raise :class:`InputError` unless ``column`` holds numbers (and at least one finite)."""
    if pd.api.types.is_bool_dtype(column):
        raise InputError(f"the target {name!r} is boolean; a regression target must be numeric")
    if not pd.api.types.is_numeric_dtype(column):
        bad = np.flatnonzero(column.notna() & pd.to_numeric(column, errors="coerce").isna())
        if len(bad):
            example = column.iloc[bad[0]]
            raise InputError(
                f"the target {name!r} is not numeric (e.g. {example!r} in data row {bad[0] + 1})"
            )
    if not np.isfinite(_floats(column)).any():
        raise InputError(f"the target {name!r} has no finite value")


def stream_table(
    frame: pd.DataFrame, spec: TabularSpec, key: str, order: npt.NDArray[np.int64] | None = None
) -> pa.Table:
    """The rows of ``frame`` (in ``order``, default file order) as the bus carries them.

    Columns: ``meter_id`` = ``key`` (every row, so a run is one partition and
    keeps its order), ``_row`` = 0, 1, ... (the stream position), the numeric
    features and the target as float64, the categorical features as strings
    (missing stays null).
    """
    if order is not None:
        frame = frame.iloc[order]
    n = len(frame)
    columns: dict[str, pa.Array] = {
        KEY: pa.array(np.full(n, key, dtype=object), pa.string()),
        ROW: pa.array(np.arange(n, dtype=np.int64)),
    }
    for name in spec.numeric:
        columns[name] = pa.array(_floats(frame[name]), pa.float64())
    for name in spec.categorical:
        values = frame[name]
        text = values.astype(str).to_numpy(dtype=object)
        columns[name] = pa.array(text, pa.string(), mask=values.isna().to_numpy())
    columns[spec.target] = pa.array(_floats(frame[spec.target]), pa.float64())
    return pa.table(columns)


def _floats(column: pd.Series[Any]) -> Floats:
    """A column as float64, NaN for missing or unparseable cells."""
    out: Floats = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return out


# -- the model -------------------------------------------------------------------


class TabularEncoder:
    """Rows of a :class:`TabularSpec` into a float matrix whose columns only ever grow.

    Layout: the numeric features first (missing or infinite: NaN, which the
    model imputes), then one 0/1 column per ``(categorical column, value)`` in
    order of first appearance. A value first seen after its column already has
    ``max_categories`` values, and a missing value, encode as all zeros.
    Growing the vocabulary reads only features, never the target, so encoding
    a batch before predicting it leaks nothing.
    """

    def __init__(self, spec: TabularSpec, max_categories: int = 50) -> None:
        self.spec = spec
        self.max_categories = max_categories
        self.vocab_: dict[str, dict[str, int]] = {c: {} for c in spec.categorical}
        self.width_ = len(spec.numeric)

    @property
    def names_(self) -> list[str]:
        """Column names of the matrix, ``column=value`` for one-hot columns."""
        names = [""] * self.width_
        names[: len(self.spec.numeric)] = self.spec.numeric
        for column, vocab in self.vocab_.items():
            for value, index in vocab.items():
                names[index] = f"{column}={value}"
        return names

    def transform(self, frame: pd.DataFrame) -> Floats:
        """The matrix of ``frame``'s rows (grows the vocabulary with new values first)."""
        n = len(frame)
        codes: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]] = []
        for column in self.spec.categorical:
            values = frame[column]
            known = values.notna().to_numpy()
            text = pd.Index(values[known].astype(str))
            vocab = self.vocab_[column]
            index = pd.Index(list(vocab), dtype=object).get_indexer(text)
            room = self.max_categories - len(vocab)
            if room > 0 and (index < 0).any():
                for value in text[index < 0].unique()[:room]:  # once per new category
                    vocab[str(value)] = self.width_
                    self.width_ += 1
                index = pd.Index(list(vocab), dtype=object).get_indexer(text)
            lookup = np.fromiter(vocab.values(), dtype=np.intp, count=len(vocab))
            found = index >= 0
            codes.append((np.flatnonzero(known)[found], lookup[index[found]]))
        out = np.zeros((n, self.width_))
        for i, column in enumerate(self.spec.numeric):
            numbers = _floats(frame[column])
            out[:, i] = np.where(np.isfinite(numbers), numbers, np.nan)  # inf: missing too
        for rows, cols in codes:
            out[rows, cols] = 1.0
        return out


class OnlineRidge:
    """Ridge regression on running-standardised features, refitted exactly per batch.

    State: the row count and the running mean and co-moment matrix of
    ``[x, y]`` (merged batch by batch with Chan et al.'s parallel update, so
    no variance is computed by the unstable ``E[x^2] - E[x]^2``). After every
    :meth:`learn_many` the coefficients are re-solved from that state: the
    features are standardised by their running standard deviation and the
    ridge penalty ``alpha`` applies to the standardised coefficients, so the
    result equals a batch ridge fit on every row seen so far. Cost per batch:
    ``O(rows x d^2 + d^3)`` NumPy work for ``d`` features, whatever the row
    count so far.

    Missing feature values are imputed with the running mean (before the
    batch). A matrix wider than the state (new one-hot columns) pads the
    state with zeros, which is exact: those columns were 0 in every row seen.
    Before any row was learned, predictions are NaN.

    >>> import numpy as np
    >>> x = np.arange(10.0).reshape(-1, 1)
    >>> model = OnlineRidge(alpha=1e-9).learn_many(x[:5], 2 * x[:5, 0] + 1)
    >>> model.predict_many(x[5:]).round(6).tolist()
    [11.0, 13.0, 15.0, 17.0, 19.0]
    """

    def __init__(self, alpha: float = 1.0) -> None:
        if not alpha > 0:
            raise ConfigError(f"OnlineRidge: alpha must be positive, got {alpha!r}")
        self.alpha = alpha
        self.n_ = 0
        self.mean_: Floats = np.zeros(1)  # [x..., y]
        self.comoment_: Floats = np.zeros((1, 1))
        self.coef_: Floats = np.zeros(0)
        self.intercept_ = math.nan

    def get_params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def clone(self) -> OnlineRidge:
        """An untrained model with the same hyper-parameters."""
        return OnlineRidge(**self.get_params())

    @property
    def width(self) -> int:
        """Number of features in the state."""
        return len(self.mean_) - 1

    def _grow(self, width: int) -> None:
        add = width - self.width
        if add <= 0:
            return
        d = self.width
        mean = np.zeros(width + 1)
        mean[:d], mean[-1] = self.mean_[:d], self.mean_[-1]
        keep = np.r_[np.arange(d), -1]
        moment = np.zeros((width + 1, width + 1))
        moment[np.ix_(np.r_[np.arange(d), width], np.r_[np.arange(d), width])] = self.comoment_[
            np.ix_(keep, keep)
        ]
        self.mean_, self.comoment_ = mean, moment
        self.coef_ = np.r_[self.coef_, np.zeros(add)]

    def _impute(self, x: Floats) -> Floats:
        missing = np.isnan(x)
        if not missing.any():
            return x
        fill = np.zeros(x.shape[1])
        fill[: self.width] = self.mean_[: min(self.width, x.shape[1])]
        return np.where(missing, fill[None, :], x)

    def predict_many(self, x: Floats) -> Floats:
        """Predictions for the rows of ``x`` (NaN before the first :meth:`learn_many`)."""
        x = np.asarray(x, dtype=np.float64)
        if self.n_ == 0:
            return np.full(len(x), np.nan)
        if x.shape[1] < self.width:
            raise InputError(f"{x.shape[1]} feature columns, the model has {self.width}")
        coef = np.r_[self.coef_, np.zeros(x.shape[1] - self.width)]
        out: Floats = self._impute(x) @ coef + self.intercept_
        return out

    def learn_many(self, x: Floats, y: Floats) -> Self:
        """Add the rows ``(x, y)`` to the state and re-solve (rows with a non-finite y skipped)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape[1] < self.width:
            raise InputError(f"{x.shape[1]} feature columns, the model has {self.width}")
        self._grow(x.shape[1])
        keep = np.isfinite(y)
        if not keep.any():
            return self
        if self.n_ == 0:  # nothing to impute with yet: the batch's own means (0 if none)
            present = ~np.isnan(x[keep])
            sums = np.where(present, x[keep], 0.0).sum(axis=0)
            counts = present.sum(axis=0)
            self.mean_[:-1] = np.divide(sums, counts, out=np.zeros(len(sums)), where=counts > 0)
        z = np.column_stack([self._impute(x[keep]), y[keep]])
        n_b = len(z)
        mean_b = z.mean(axis=0)
        centred = z - mean_b
        moment_b = centred.T @ centred
        n_a = self.n_
        n = n_a + n_b
        delta = mean_b - self.mean_
        if n_a == 0:
            self.mean_, self.comoment_ = mean_b, moment_b
        else:
            self.mean_ = self.mean_ + delta * (n_b / n)
            self.comoment_ = self.comoment_ + moment_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n_ = n
        self._solve()
        return self

    def _solve(self) -> None:
        d = self.width
        sxx = self.comoment_[:d, :d]
        sxy = self.comoment_[:d, d]
        std = np.sqrt(np.maximum(np.diag(sxx), 0.0) / self.n_)
        std = np.where(std > 1e-12 * (1.0 + np.abs(self.mean_[:d])), std, 1.0)
        scaled = sxx / np.outer(std, std)
        beta = np.linalg.solve(scaled + self.alpha * np.eye(d), sxy / std) if d else np.zeros(0)
        self.coef_ = beta / std
        self.intercept_ = float(self.mean_[d] - self.coef_ @ self.mean_[:d])


class RunningMean:
    """The baseline: predicts the mean of every target learned so far (NaN before any)."""

    def __init__(self) -> None:
        self.n_ = 0
        self.mean_ = math.nan

    def predict_many(self, x: Floats) -> Floats:
        return np.full(len(x), self.mean_)

    def learn_many(self, x: Floats, y: Floats) -> Self:
        y = np.asarray(y, dtype=np.float64)
        y = y[np.isfinite(y)]
        if len(y):
            total = (0.0 if self.n_ == 0 else self.mean_ * self.n_) + float(y.sum())
            self.n_ += len(y)
            self.mean_ = total / self.n_
        return self


# -- prequential scoring ------------------------------------------------------------


@dataclass(frozen=True)
class BatchScore:
    """Prequential scores of one micro-batch (``None`` where nothing could be scored).

    ``n`` rows arrived, ``scored`` of them had a finite target and a
    prediction (none in the first batch: nothing was learned yet), ``seen``
    rows were learned before this batch. ``cum_*`` cover every scored row up
    to and including this batch.
    """

    batch: int
    n: int
    scored: int
    seen: int
    rmse: float | None
    mae: float | None
    cum_rmse: float | None
    baseline_rmse: float | None
    baseline_mae: float | None
    baseline_cum_rmse: float | None

    def to_json(self) -> str:
        return json.dumps({k: _round(v) for k, v in asdict(self).items()})

    @staticmethod
    def table_header() -> str:
        return (
            f"{'batch':>5} {'n':>6} {'seen':>7}  {'rmse':>9} {'mae':>9} {'cum_rmse':>9}"
            f"  {'base_rmse':>9} {'base_mae':>9} {'base_cum':>9}"
        )

    def table_row(self) -> str:
        def f(v: float | None) -> str:
            return f"{'-':>9}" if v is None else f"{v:>9.3f}"

        return (
            f"{self.batch:>5} {self.n:>6} {self.seen:>7}  {f(self.rmse)} {f(self.mae)} "
            f"{f(self.cum_rmse)}  {f(self.baseline_rmse)} {f(self.baseline_mae)} "
            f"{f(self.baseline_cum_rmse)}"
        )


def _round(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else v


class _Tally:
    """Running sums of squared and absolute errors of one predictor."""

    def __init__(self) -> None:
        self.n = 0
        self.sse = 0.0

    def score(self, err: Floats) -> tuple[float | None, float | None, float | None]:
        """This batch's RMSE and MAE, and the cumulative RMSE including it."""
        if len(err):
            self.n += len(err)
            self.sse += float(err @ err)
        cum = math.sqrt(self.sse / self.n) if self.n else None
        if not len(err):
            return None, None, cum
        return math.sqrt(float(err @ err) / len(err)), float(np.abs(err).mean()), cum


def prequential(
    batches: Iterable[pd.DataFrame],
    spec: TabularSpec,
    model: OnlineRidge | None = None,
    max_categories: int = 50,
) -> Iterator[BatchScore]:
    """Predict, score, then learn each micro-batch, for the model and the running-mean baseline.

    The predictions for a batch are made before its targets reach either
    learner, so a score never includes a row the model has learned from.
    """
    model = model if model is not None else OnlineRidge()
    baseline = RunningMean()
    encoder = TabularEncoder(spec, max_categories)
    tallies = (_Tally(), _Tally())
    for number, frame in enumerate(batches, start=1):
        x = encoder.transform(frame)
        y = _floats(frame[spec.target])
        predictions = (model.predict_many(x), baseline.predict_many(x))
        ok = np.isfinite(y) & np.isfinite(predictions[0]) & np.isfinite(predictions[1])
        (rmse, mae, cum), (b_rmse, b_mae, b_cum) = (
            tally.score(p[ok] - y[ok]) for tally, p in zip(tallies, predictions, strict=True)
        )
        seen = model.n_
        model.learn_many(x, y)
        baseline.learn_many(x, y)
        yield BatchScore(
            number, len(frame), int(ok.sum()), seen, rmse, mae, cum, b_rmse, b_mae, b_cum
        )


# -- over the bus ----------------------------------------------------------------------


def replay(
    pipe: Pipeline,
    frame: pd.DataFrame,
    spec: TabularSpec,
    batch_rows: int = 20,
    shuffle: bool = False,
    seed: int = 0,
    model: OnlineRidge | None = None,
    idle_timeout: float = _IDLE_TIMEOUT,
) -> Iterator[BatchScore]:
    """Publish ``frame`` to :data:`TABULAR`, consume it back and score it prequentially.

    The rows go out in messages of ``batch_rows`` rows (file order, or a
    permutation drawn from ``seed`` with ``shuffle``) under a fresh stream
    key, and come back through a fresh consumer group ``kappa-<run>``: as in
    a Kappa reprocessing, a new group reads the topic from its start (rows of
    earlier runs still retained are read and skipped), so two runs at the same
    time never take each other's partitions. A message's offsets are committed
    once its rows are handed to the scorer; the model lives in this process,
    so a crashed run is simply run again. Duplicates of an at-least-once
    redelivery are dropped by ``_row``. Raises :class:`BackendError` when no
    new row arrives for ``idle_timeout`` seconds.
    """
    if batch_rows < 1:
        raise InputError(f"--batch-rows must be at least 1, got {batch_rows}")
    run = uuid.uuid4().hex[:12]
    key = f"kappa:{run}"
    order = np.random.default_rng(seed).permutation(len(frame)) if shuffle else None
    table = stream_table(frame, spec, key, order)
    bus = pipe.bus
    bus.create_topics([TABULAR])
    for start in range(0, table.num_rows, batch_rows):
        pipe.producer.send(TABULAR, table.slice(start, batch_rows))
    pipe.producer.flush()
    poll_timeout = pipe.settings.worker.poll_timeout
    with bus.consumer(f"kappa-{run}", [TABULAR]) as consumer:
        arrived = _arrivals(consumer, key, table.num_rows, batch_rows, poll_timeout, idle_timeout)
        yield from prequential(_cut(arrived, batch_rows), spec, model)


def _arrivals(
    consumer: Consumer,
    key: str,
    total: int,
    batch_rows: int,
    poll_timeout: float,
    idle_timeout: float,
) -> Iterator[pa.Table]:
    """This run's rows as they come off the bus, in stream order, each row once."""
    from meterops.pipeline import commit_map

    expected = 0
    last_progress = time.monotonic()
    while expected < total:
        messages = consumer.poll(batch_rows, poll_timeout)
        if not messages:
            if time.monotonic() - last_progress > idle_timeout:
                raise BackendError(
                    f"only {expected} of {total} rows came back from the bus topic "
                    f"{TABULAR!r} within {idle_timeout:.0f} s; is the bus up?"
                )
            continue
        for message in messages:
            table = message.table
            ours = table.filter(pc.equal(table.column(KEY), key))
            ours = ours.filter(pc.greater_equal(ours.column(ROW), expected))
            if ours.num_rows:
                first = int(ours.column(ROW)[0].as_py())
                if first != expected:
                    raise BackendError(
                        f"the bus lost rows of the stream: expected row {expected}, got {first}"
                    )
                expected += ours.num_rows
                last_progress = time.monotonic()
                yield ours
        consumer.commit(commit_map(messages))


def _cut(tables: Iterable[pa.Table], batch_rows: int) -> Iterator[pd.DataFrame]:
    """Micro-batches of exactly ``batch_rows`` rows (the last may be shorter) from arrivals."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= batch_rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, batch_rows).to_pandas()
            rest = joined.slice(batch_rows)
            pending, held = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if held:
        yield pa.concat_tables(pending).to_pandas()


def run(
    settings: Settings,
    path: Path,
    target: str,
    *,
    features: Sequence[str] | None = None,
    batch_rows: int = 20,
    shuffle: bool = False,
    seed: int = 0,
    delimiter: str | None = None,
    fmt: str = "table",
    emit: Callable[[str], None] = print,
    note: Callable[[str], None] = print,
) -> list[BatchScore]:
    """The ``meterops replay FILE --target COLUMN`` command: read, check, replay, print.

    ``emit`` gets one line per micro-batch (a JSON object with ``fmt="json"``,
    a table row otherwise, after a header); ``note`` gets what the file held
    and the closing comparison with the baseline. Returns the scores.
    """
    from meterops.pipeline import Pipeline

    if fmt not in ("table", "json"):
        raise InputError(f"unknown --format {fmt!r}; valid formats are: table, json")
    frame = read_table(path, delimiter)
    spec = TabularSpec.infer(frame, target, features)
    note(_describe(path, frame, spec, batch_rows, shuffle, seed))
    scores: list[BatchScore] = []
    with Pipeline(settings) as pipe:
        if fmt == "table":
            emit(BatchScore.table_header())
        for score in replay(pipe, frame, spec, batch_rows, shuffle, seed):
            scores.append(score)
            emit(score.to_json() if fmt == "json" else score.table_row())
    note(_verdict(scores))
    return scores


def _describe(
    path: Path, frame: pd.DataFrame, spec: TabularSpec, batch_rows: int, shuffle: bool, seed: int
) -> str:
    parts = [f"read {len(frame)} rows of {path.name}; target {spec.target}"]
    if spec.numeric:
        parts.append(f"numeric: {', '.join(spec.numeric)}")
    if spec.categorical:
        parts.append(f"one-hot: {', '.join(spec.categorical)}")
    if spec.ignored:
        parts.append(f"left out (too many distinct values): {', '.join(spec.ignored)}")
    batches = -(-len(frame) // batch_rows)
    order = f"shuffled (seed {seed})" if shuffle else "file order"
    parts.append(
        f"streaming to bus topic {TABULAR!r} in {batches} micro-batches of {batch_rows} rows, "
        f"{order}"
    )
    return "; ".join(parts)


def _verdict(scores: Sequence[BatchScore]) -> str:
    last = scores[-1] if scores else None
    if last is None or last.cum_rmse is None or last.baseline_cum_rmse is None:
        return "nothing scored: the first micro-batch only teaches; use a smaller --batch-rows"
    scored = sum(s.scored for s in scores)
    gain = 1.0 - last.cum_rmse / last.baseline_cum_rmse if last.baseline_cum_rmse else 0.0
    return (
        f"online ridge: cumulative RMSE {last.cum_rmse:.3f} over {scored} scored rows; "
        f"running-mean baseline {last.baseline_cum_rmse:.3f} "
        f"({abs(gain):.0%} {'lower' if gain >= 0 else 'higher'} for the model)"
    )
