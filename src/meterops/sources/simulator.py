"""A fleet of simulated meters with realistic load and labelled injected anomalies.

The simulator exists so that every part of meterops (validation, features,
forecasting, anomaly detection, clustering, the live loop) can be exercised at
any scale without real customer data, and judged against a known ground truth.

How a reading is made, per meter ``m`` and time step ``t``::

    value = base[m] * shape[m](local week-hour of t + phase[m])
                    * (1 + heat[m] * HDD(t) + cool[m] * CDD(t))
                    * exp(AR(1) noise[m, t])

* ``base`` is lognormal per archetype: ``residential`` (about 0.8 kW),
  ``office`` (weekday daytime, about 6 kW) and ``night_shift`` (about 3 kW),
  so clustering by load profile has real groups to find.
* ``shape`` is a weekly profile with mean 1: the real UCI household's
  (:func:`meterops.datasets.daily_profile`) for residential meters, a blend of
  it with a working-hours or night template for the others, then made more or
  less peaky per meter and shifted by a per-meter phase (a fraction of an hour).
* one shared temperature series (annual and daily cycles plus AR(1) weather,
  a temperate climate between about -5 and 30 degrees C) drives heating below
  15 degrees C and cooling above 22 degrees C, with per-meter sensitivities.

Anomalies are scheduled up front (Poisson, ``anomaly_rate`` per meter per 30
days, non-overlapping per meter with at least one normal reading between) and
applied to the generated values; every affected reading carries the kind in
``label``. ``Simulation.anomalies`` lists them with ``start`` and ``end`` as
the first and last affected reading (inclusive).

Everything is generated in fixed blocks of time steps with a random stream
per block and the AR states carried over, vectorized across meters, so the
whole fleet (:func:`simulate`) and the same fleet step by step
(:class:`FleetStream`) produce identical readings.

>>> sim = simulate(FleetSpec(meters=3, periods=48, seed=1))
>>> len(sim.readings), list(sim.readings.columns)
(144, ['meter_id', 'ts', 'value', 'temperature', 'label'])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from meterops.datasets import daily_profile
from meterops.errors import ConfigError
from meterops.types import ReadingBatch

__all__ = [
    "ARCHETYPES",
    "KINDS",
    "FleetSpec",
    "FleetStream",
    "Simulation",
    "simulate",
    "write_ground_truth",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
CodeArray = npt.NDArray[np.int8]
ObjectArray = npt.NDArray[np.object_]

KINDS = ("spike", "dropout", "level_shift", "stuck")
ARCHETYPES = ("residential", "office", "night_shift")

# Label codes: 0 is a normal reading, 1.. follow KINDS.
_SPIKE, _DROPOUT, _LEVEL, _STUCK = 1, 2, 3, 4
_LABELS: ObjectArray = np.array(["", *KINDS], dtype=object)

# Steps generated per block. Fixed, so results never depend on how a caller
# slices the stream; large enough that per-block overhead is negligible.
_BLOCK = 336
_WEEK = 168
_ARCHETYPE_SHARE = (0.6, 0.25, 0.15)
_BASE_KW = np.array([0.8, 6.0, 3.0])
_BASE_SIGMA = np.array([0.45, 0.6, 0.5])
_HEAT_RANGE = (np.array([0.015, 0.005, 0.004]), np.array([0.05, 0.02, 0.015]))  # per degree C
_COOL_RANGE = (np.array([0.002, 0.02, 0.005]), np.array([0.02, 0.06, 0.02]))
_HEAT_BELOW, _COOL_ABOVE = 15.0, 22.0
_WEATHER_PHI_HOURLY, _WEATHER_SD = 0.97, 3.0
_NOISE_PHI_HOURLY = 0.6
_MAX_SCHEDULE_ROUNDS = 10
_DEFAULT_START = pd.Timestamp("2024-01-01", tz="UTC")


@dataclass(frozen=True)
class FleetSpec:
    """What to simulate; every random choice derives from ``seed``.

    ``anomaly_rate`` is the expected number of anomalies per meter per 30 days;
    ``noise`` the standard deviation of the multiplicative AR(1) noise (log
    scale); ``temperature_sensitivity`` scales every meter's heating and
    cooling response (0 switches weather off); ``timezone`` is the fleet's
    local time, which daily routines follow. Timestamps are UTC; a naive
    ``start`` is taken as UTC.
    """

    meters: int = 10
    start: pd.Timestamp = _DEFAULT_START
    periods: int = 24 * 28
    freq: str = "1h"
    seed: int = 0
    anomaly_rate: float = 2.0
    noise: float = 0.08
    temperature_sensitivity: float = 1.0
    kinds: tuple[str, ...] = KINDS
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        start = pd.Timestamp(self.start)
        start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if self.meters < 1:
            raise ConfigError(f"meters must be at least 1, got {self.meters}")
        if self.periods < 0:
            raise ConfigError(f"periods must be 0 or more, got {self.periods}")
        if self.seed < 0:
            raise ConfigError(f"seed must be 0 or more, got {self.seed}")
        try:
            step = pd.Timedelta(self.freq)
        except ValueError as exc:
            raise ConfigError(f"freq {self.freq!r} is not a duration such as 1h or 15min") from exc
        if step <= pd.Timedelta(0) or pd.Timedelta("1D") % step != pd.Timedelta(0):
            raise ConfigError(f"freq must divide a day (e.g. 1h, 30min, 15min), got {self.freq!r}")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ConfigError(f"unknown anomaly kinds {unknown}; valid kinds are {list(KINDS)}")
        for name in ("anomaly_rate", "noise", "temperature_sensitivity"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")

    @property
    def step(self) -> pd.Timedelta:
        """The time between two readings of a meter."""
        return pd.Timedelta(self.freq)

    @property
    def steps_per_day(self) -> int:
        return int(pd.Timedelta("1D") // self.step)

    @property
    def meter_ids(self) -> list[str]:
        """``m-0001`` ... (zero-padded so ids sort in meter order)."""
        width = max(4, len(str(self.meters)))
        return [f"m-{i:0{width}d}" for i in range(1, self.meters + 1)]

    def timestamps(self, first: int = 0, count: int | None = None) -> pd.DatetimeIndex:
        """UTC timestamps of steps ``first`` .. ``first + count - 1`` (default: to the end)."""
        n = self.periods - first if count is None else count
        return pd.date_range(self.start + first * self.step, periods=n, freq=self.step)


@dataclass(frozen=True, eq=False)
class Simulation:
    """A simulated fleet: readings, the ground truth, and who each meter is.

    ``readings`` is in time order (every meter at a step, then the next step):
    ``meter_id``, ``ts`` (UTC), ``value`` (kW, never negative, 0.0 in a
    dropout), ``temperature`` (degrees C, shared by the fleet) and ``label``
    ("" or the anomaly kind). ``anomalies`` has one row per injected anomaly:
    ``meter_id``, ``start``, ``end`` (inclusive), ``kind``. ``meters`` gives
    each meter's ``archetype`` and ``base_kw``, the truth for clustering.
    """

    readings: pd.DataFrame
    anomalies: pd.DataFrame
    meters: pd.DataFrame

    def batch(self) -> ReadingBatch:
        """The readings as a :class:`ReadingBatch` (label dropped, temperature kept)."""
        return ReadingBatch.from_pandas(self.readings.drop(columns="label"))


# ---------------------------------------------------------------- meter make-up


def _window(hours: FloatArray, start: float, end: float, width: float = 0.6) -> FloatArray:
    """A smooth 0..1 indicator of ``start <= h < end`` on a 24 h clock (may wrap midnight)."""
    total = np.zeros_like(hours)
    for shift in (-24.0, 0.0, 24.0):
        h = hours + shift
        total += 1.0 / (1.0 + np.exp(-(h - start) / width)) / (1.0 + np.exp(-(end - h) / width))
    return total


def _templates() -> FloatArray:
    """Weekly shapes (3 archetypes x 168 week-hours), each with mean 1."""
    household = np.asarray(daily_profile(), dtype=np.float64).ravel()
    hours = np.tile(np.arange(24, dtype=np.float64) + 0.5, 7)
    weekday = np.repeat(np.arange(7), 24) < 5
    office = np.where(
        weekday,
        0.3 + _window(hours, 7.5, 18.5) - 0.12 * _window(hours, 12.0, 13.5),
        0.3 + 0.1 * _window(hours, 9.0, 13.0),
    )
    sunday = np.repeat(np.arange(7), 24) == 6
    night = 0.35 + np.where(sunday, 0.3, 1.0) * _window(hours, 21.0, 30.0)
    shapes = np.stack(
        [
            household,
            0.85 * office / office.mean() + 0.15 * household,
            0.85 * night / night.mean() + 0.15 * household,
        ]
    )
    normalised: FloatArray = shapes / shapes.mean(axis=1, keepdims=True)
    return normalised


@dataclass(frozen=True)
class _Fleet:
    archetype: IntArray
    base: FloatArray
    week: FloatArray  # (meters, 168), mean 1 per meter
    phase: FloatArray  # hours
    heat: FloatArray  # relative load increase per degree C below _HEAT_BELOW
    cool: FloatArray  # relative load increase per degree C above _COOL_ABOVE


def _make_fleet(spec: FleetSpec, rng: np.random.Generator) -> _Fleet:
    m = spec.meters
    archetype = rng.choice(len(ARCHETYPES), size=m, p=_ARCHETYPE_SHARE).astype(np.int64)
    base = _BASE_KW[archetype] * np.exp(_BASE_SIGMA[archetype] * rng.standard_normal(m))
    peakiness = rng.uniform(0.7, 1.4, m)
    week = _templates()[archetype] ** peakiness[:, None]
    week /= week.mean(axis=1, keepdims=True)
    phase = rng.normal(0.0, 0.75, m)
    sensitivity = spec.temperature_sensitivity
    heat = rng.uniform(_HEAT_RANGE[0][archetype], _HEAT_RANGE[1][archetype]) * sensitivity
    cool = rng.uniform(_COOL_RANGE[0][archetype], _COOL_RANGE[1][archetype]) * sensitivity
    return _Fleet(archetype, base, week, phase, heat, cool)


# ---------------------------------------------------------------- anomaly schedule


@dataclass(frozen=True)
class _Events:
    """Injected anomalies, sorted by (start, meter); start/end are inclusive step indices."""

    meter: IntArray
    kind: IntArray
    start: IntArray
    end: IntArray
    factor: FloatArray  # spike: multiplier; level shift: multiplier
    add: FloatArray  # spike: minimum increase in kW

    def __len__(self) -> int:
        return len(self.meter)


def _schedule(spec: FleetSpec, base: FloatArray, rng: np.random.Generator) -> _Events:
    """Draw a Poisson number of anomalies per meter and place them without overlap.

    Placement is vectorized: every round proposes positions for the anomalies
    not yet placed, accepts those clear of the placed ones and of earlier
    proposals (one free step between), and retries the rest a few times.
    """
    n_steps, spd = spec.periods, spec.steps_per_day
    codes = np.array([KINDS.index(k) + 1 for k in spec.kinds], dtype=np.int64)
    days = n_steps / spd
    lam = spec.anomaly_rate * days / 30.0 if len(codes) and n_steps else 0.0
    counts = rng.poisson(lam, spec.meters)
    meter = np.repeat(np.arange(spec.meters, dtype=np.int64), counts)
    kind = rng.choice(codes, size=len(meter)) if len(codes) else np.zeros(0, np.int64)
    lo = np.array([0, 1, 2, 2 * spd, 6], dtype=np.int64)[kind]
    hi = np.array([0, 1, 12, 14 * spd, 48], dtype=np.int64)[kind]

    span = np.int64(n_steps + 2)  # keys of different meters never come within the gap
    placed_meter = np.zeros(0, np.int64)
    placed_kind = np.zeros(0, np.int64)
    placed_start = np.zeros(0, np.int64)
    placed_end = np.zeros(0, np.int64)
    for _ in range(_MAX_SCHEDULE_ROUNDS):
        if len(meter) == 0:
            break
        length = rng.integers(lo, hi + 1)
        room = n_steps - length + 1
        start = rng.integers(0, np.maximum(room, 1))
        end = start + length - 1
        fits = room > 0
        meter, kind, lo, hi = meter[fits], kind[fits], lo[fits], hi[fits]
        start, end = start[fits], end[fits]
        key_start, key_end = meter * span + start, meter * span + end

        order = np.argsort(placed_meter * span + placed_start, kind="stable")
        p_start = (placed_meter * span + placed_start)[order]
        p_end = (placed_meter * span + placed_end)[order]
        pos = np.searchsorted(p_start, key_start, side="right")
        clear = np.ones(len(meter), dtype=bool)
        if len(p_start):
            prev = np.clip(pos - 1, 0, None)
            clear &= ~((pos > 0) & (p_end[prev] + 1 >= key_start))
            nxt = np.clip(pos, None, len(p_start) - 1)
            clear &= ~((pos < len(p_start)) & (p_start[nxt] <= key_end + 1))

        # Among this round's clear proposals, keep each one that starts after
        # every earlier proposal has ended (so accepted ones never overlap).
        idx = np.flatnonzero(clear)
        idx = idx[np.argsort(key_start[idx], kind="stable")]
        ends = key_end[idx]
        before = np.maximum.accumulate(np.concatenate([[-2], ends[:-1]]))
        ok = idx[before + 1 < key_start[idx]]
        accepted = np.zeros(len(meter), dtype=bool)
        accepted[ok] = True

        placed_meter = np.concatenate([placed_meter, meter[accepted]])
        placed_kind = np.concatenate([placed_kind, kind[accepted]])
        placed_start = np.concatenate([placed_start, start[accepted]])
        placed_end = np.concatenate([placed_end, end[accepted]])
        rest = ~accepted
        meter, kind, lo, hi = meter[rest], kind[rest], lo[rest], hi[rest]

    order = np.lexsort((placed_meter, placed_start))
    meter, kind = placed_meter[order], placed_kind[order]
    n = len(meter)
    spike_factor = rng.uniform(3.0, 8.0, n)
    up = rng.random(n) < 0.5
    shift = np.where(up, rng.uniform(1.6, 2.5, n), rng.uniform(0.4, 0.6, n))
    factor = np.where(kind == _SPIKE, spike_factor, np.where(kind == _LEVEL, shift, 1.0))
    add = base[meter] * rng.uniform(3.0, 6.0, n)
    return _Events(meter, kind, placed_start[order], placed_end[order], factor, add)


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Block:
    first: int  # index of the first step
    values: FloatArray  # (steps, meters)
    temperature: FloatArray  # (steps,)
    codes: CodeArray  # (steps, meters)

    def __len__(self) -> int:
        return len(self.temperature)


class _Engine:
    """Produces the fleet block after block; blocks must be taken in order.

    State carried between blocks: the weather and noise AR(1) values, and the
    value each stuck anomaly repeats (read when its first step is generated).
    """

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.fleet = _make_fleet(spec, np.random.default_rng([spec.seed, 0]))
        self.events = _schedule(spec, self.fleet.base, np.random.default_rng([spec.seed, 1]))
        self._stuck_value = np.full(len(self.events), np.nan)
        hours = spec.step / pd.Timedelta("1h")
        self._weather_phi = _WEATHER_PHI_HOURLY**hours
        self._noise_phi = _NOISE_PHI_HOURLY**hours
        init = np.random.default_rng([spec.seed, 2])
        self._weather = _WEATHER_SD * float(init.standard_normal())
        self._noise = spec.noise * init.standard_normal(spec.meters)
        self._next = 0

    def next_block(self) -> _Block | None:
        spec, fleet = self.spec, self.fleet
        first = self._next * _BLOCK
        if first >= spec.periods:
            return None
        n = min(_BLOCK, spec.periods - first)
        rng = np.random.default_rng([spec.seed, 3, self._next])
        self._next += 1

        ts = spec.timestamps(first, n)
        local = ts.tz_convert(spec.timezone)
        hour = local.hour.to_numpy() + local.minute.to_numpy() / 60.0
        week_hour = local.weekday.to_numpy() * 24.0 + hour

        # Shared temperature: seasonal (coldest late January) + daily (warmest
        # mid-afternoon) + persistent weather.
        day_of_year = ts.dayofyear.to_numpy() + ts.hour.to_numpy() / 24.0
        seasonal = 11.5 - 7.5 * np.cos(2 * np.pi * (day_of_year - 20.0) / 365.25)
        diurnal = 3.5 * np.cos(2 * np.pi * (hour - 15.0) / 24.0)
        weather = self._ar1(
            rng.standard_normal(n), self._weather_phi, _WEATHER_SD, np.array(self._weather)
        )
        self._weather = float(weather[-1])
        temperature = seasonal + diurnal + weather

        u = week_hour[:, None] + fleet.phase[None, :]
        floor = np.floor(u)
        frac = u - floor
        i0 = floor.astype(np.int64) % _WEEK
        rows = np.arange(spec.meters)[None, :]
        shape = fleet.week[rows, i0] * (1.0 - frac) + fleet.week[rows, (i0 + 1) % _WEEK] * frac

        hdd = np.maximum(_HEAT_BELOW - temperature, 0.0)[:, None]
        cdd = np.maximum(temperature - _COOL_ABOVE, 0.0)[:, None]
        climate = 1.0 + fleet.heat[None, :] * hdd + fleet.cool[None, :] * cdd

        noise = self._ar1(
            rng.standard_normal((n, spec.meters)), self._noise_phi, spec.noise, self._noise
        )
        self._noise = noise[-1].copy()
        values = fleet.base[None, :] * shape * climate * np.exp(noise - spec.noise**2 / 2.0)
        codes = np.zeros((n, spec.meters), dtype=np.int8)
        self._inject(first, values, codes)
        return _Block(first, values, np.round(temperature, 1), codes)

    @staticmethod
    def _ar1(shocks: FloatArray, phi: float, sd: float, state: FloatArray) -> FloatArray:
        """AR(1) with stationary standard deviation ``sd``, continuing from ``state``.

        The loop runs over time steps only (each step is one vector operation
        across meters), never over individual readings.
        """
        out = np.empty_like(shocks)
        scale = sd * np.sqrt(1.0 - phi**2)
        x = state
        for i in range(len(shocks)):
            x = phi * x + scale * shocks[i]
            out[i] = x
        return out

    def _inject(self, first: int, values: FloatArray, codes: CodeArray) -> None:
        ev = self.events
        last = first + len(values) - 1
        idx = np.flatnonzero((ev.start <= last) & (ev.end >= first))
        if len(idx) == 0:
            return
        lo = np.maximum(ev.start[idx], first)
        hi = np.minimum(ev.end[idx], last)
        lengths = hi - lo + 1
        which = np.repeat(idx, lengths)
        offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
        t = np.repeat(lo - first, lengths) + np.arange(int(lengths.sum())) - offsets
        m = ev.meter[which]

        begins = idx[(ev.kind[idx] == _STUCK) & (ev.start[idx] >= first)]
        self._stuck_value[begins] = values[ev.start[begins] - first, ev.meter[begins]]

        kind = ev.kind[which]
        v = values[t, m]
        spiked = np.maximum(v * ev.factor[which], v + ev.add[which])
        new = np.select(
            [kind == _SPIKE, kind == _DROPOUT, kind == _LEVEL, kind == _STUCK],
            [spiked, np.zeros_like(v), v * ev.factor[which], self._stuck_value[which]],
            default=v,
        )
        values[t, m] = new
        codes[t, m] = kind.astype(np.int8)


def _frame(
    spec: FleetSpec, ids: ObjectArray, first: int, parts: list[tuple[_Block, int, int]]
) -> pd.DataFrame:
    """Readings for consecutive block slices ``(block, begin, stop)`` starting at step ``first``."""
    values = [b.values[i:j] for b, i, j in parts]
    temperature = [b.temperature[i:j] for b, i, j in parts]
    codes = [b.codes[i:j] for b, i, j in parts]
    m = len(ids)
    v = np.concatenate(values) if values else np.zeros((0, m))
    temp = np.concatenate(temperature) if temperature else np.zeros(0)
    c = np.concatenate(codes) if codes else np.zeros((0, m), dtype=np.int8)
    steps = len(temp)
    frame = pd.DataFrame(
        {
            "ts": spec.timestamps(first, steps).repeat(m),
            "value": v.ravel(),
            "temperature": np.repeat(temp, m),
        },
        copy=False,  # the arrays are fresh and private; copying them doubles the cost
    )
    # Text columns are inserted afterwards: building them in the constructor
    # would merge them into one 2-D object block, a copy of every pointer that
    # costs more than generating the fleet.
    frame.insert(0, "meter_id", np.tile(ids, steps))
    frame["label"] = _LABELS[c.ravel()]
    return frame


def simulate(spec: FleetSpec) -> Simulation:
    """Generate the whole fleet at once (1,000 meters x a year hourly in a few seconds)."""
    engine = _Engine(spec)
    ids = np.array(spec.meter_ids, dtype=object)
    parts: list[tuple[_Block, int, int]] = []
    while (block := engine.next_block()) is not None:
        parts.append((block, 0, len(block)))
    readings = _frame(spec, ids, 0, parts)

    ev = engine.events
    grid = spec.timestamps()
    anomalies = pd.DataFrame(
        {
            "meter_id": ids[ev.meter],
            "start": grid[ev.start],
            "end": grid[ev.end],
            "kind": _LABELS[ev.kind],
        }
    )
    fleet = engine.fleet
    meters = pd.DataFrame(
        {
            "meter_id": ids,
            "archetype": np.array(ARCHETYPES, dtype=object)[fleet.archetype],
            "base_kw": fleet.base,
        }
    )
    return Simulation(readings, anomalies, meters)


class FleetStream:
    """The fleet of :func:`simulate`, produced a few time steps at a time for live use.

    Concatenating every :meth:`next_batch` result gives exactly
    ``simulate(spec).readings`` (same values, labels and order), whatever the
    batch sizes, because both draw the same blocks in the same order.
    """

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self._engine = _Engine(spec)
        self._ids = np.array(spec.meter_ids, dtype=object)
        self._block: _Block | None = None
        self._offset = 0
        self._position = 0

    @property
    def position(self) -> int:
        """How many time steps have been returned so far."""
        return self._position

    @property
    def done(self) -> bool:
        """True once all ``spec.periods`` steps have been returned."""
        return self._position >= self.spec.periods

    def next_batch(self, steps: int = 1) -> pd.DataFrame:
        """The readings of the next ``steps`` time steps for every meter.

        Fewer steps (possibly none) are returned at the end of the spec's
        periods; the columns are those of :attr:`Simulation.readings`.
        """
        if steps < 0:
            raise ValueError(f"steps must be 0 or more, got {steps}")
        want = min(steps, self.spec.periods - self._position)
        parts: list[tuple[_Block, int, int]] = []
        need = want
        while need > 0:
            if self._block is None or self._offset >= len(self._block):
                self._block = self._engine.next_block()
                self._offset = 0
                if self._block is None:  # pragma: no cover - guarded by ``want``
                    break
            take = min(need, len(self._block) - self._offset)
            parts.append((self._block, self._offset, self._offset + take))
            self._offset += take
            need -= take
        frame = _frame(self.spec, self._ids, self._position, parts)
        self._position += want
        return frame


def write_ground_truth(sim: Simulation, path: str | Path) -> Path:
    """Write ``sim.anomalies`` as CSV (``meter_id,start,end,kind``, ISO 8601 UTC with ``Z``).

    ``start`` and ``end`` are the first and last affected readings, inclusive.
    """
    target = Path(path)
    sim.anomalies.to_csv(target, index=False, date_format="%Y-%m-%dT%H:%M:%SZ")
    return target
