"""The stream's online learners in the registry: merged, logged, judged by the champion gate.

Each bus partition has its own online learner (:mod:`meterops.online_stream`),
checkpointed in the store as ``online/{group}/{source}`` after every
micro-batch. Every ``scoring.online_registry_every`` seconds one worker of
the group (the one owning partition ``readings/0``, so exactly one while the
group is balanced) calls :meth:`OnlineRegistryLog.maybe_log`, which:

1. reads every checkpoint ``online/{group}/*`` and merges the learners into
   one model (:meth:`OnlineForecaster.merge
   <meterops.models.online.OnlineForecaster.merge>`: summed statistics, the
   model one learner fed every meter would be);
2. sums the prequential metrics of ``online_metrics`` recorded since the
   previous log: the rows of each partition from the offset of the previous
   version's checkpoint up to (not including) the current one, so no batch
   is counted twice or missed, whichever worker wrote it;
3. logs a registry version of family ``online`` with those metrics
   (``prequential_rmse_h1``, ``prequential_mae_h1``,
   ``prequential_persistence_rmse_h1``, ``prequential_persistence_mae_h1``,
   ``prequential_n_h1``), the data range (readings learned since the previous
   log) and lineage (the checkpoint offsets per partition), exactly as
   ``meterops train`` logs a trained model (:meth:`Registry.log_training_run
   <meterops.registry.Registry.log_training_run>`);
4. runs the registry's own champion gate (:meth:`Registry.gate
   <meterops.registry.Registry.gate>`), as ``meterops train`` does, with the
   stored readings of the last :data:`GATE_HISTORY` as its data: the gate
   re-runs the champion's and the online recipe on the same folds and
   promotes the new version only if it wins by the configured margin (with
   no champion yet, the first version becomes champion).

Steps 1-3 take about a second and run in the worker's thread; the gate
re-trains the champion's recipe (minutes for a large GBM), so it runs in a
background thread: a worker stalled that long would miss its consumer-group
heartbeats. While a gate runs no new version is logged.

Where the previous log stands (its time, offsets and data end) is kept in
the version's tags (``meterops.online_group``, ``meterops.online_offsets``,
``meterops.data_end``, ``meterops.logged_at``), so a restarted worker
neither logs early nor counts metrics twice. A version is logged only when
the learners learned something since the previous one. Every error (store,
registry, a model that cannot be merged) is logged and retried a minute
later; none reaches the worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from meterops.bus.base import READINGS
from meterops.errors import InputError
from meterops.models.online import OnlineForecaster
from meterops.online_stream import ONLINE_LABEL, unpack_state
from meterops.settings import Settings, redact_url
from meterops.store.base import Checkpoint, Store

if TYPE_CHECKING:
    from meterops.registry import GateResult, Registry

__all__ = ["GATE_HISTORY", "LEADER", "OnlineRegistryLog"]

log = logging.getLogger("meterops.online_registry")

#: The partition whose owner logs for the whole group.
LEADER = f"{READINGS}/0"
#: Stored readings the gate re-runs both recipes on: three rolling-origin folds
#: with weekly features need a few weeks; a bound keeps the gate's cost flat as
#: the store grows.
GATE_HISTORY = pd.Timedelta("28d")
_RETRY = 60.0  # seconds before the next attempt after an error or with nothing learned yet
_METRIC_ROWS = 4096  # first page of online_metrics rows read back (grows until it covers)
_FAMILY = ONLINE_LABEL


_Learned = tuple[OnlineForecaster, int]  # a learner and the next bus offset it learned


@dataclass(frozen=True)
class _Mark:
    """Where the previous logged version stands: when, which offsets, up to which reading."""

    version: int
    at: float
    offsets: Mapping[str, int]
    end: pd.Timestamp | None


class OnlineRegistryLog:
    """Logs the merged online model of one consumer group to the registry, now and then.

    ``OnlineRegistryLog(settings, store, group)`` with the worker's own
    store; call :meth:`maybe_log` after every committed micro-batch (it
    returns at once unless a version is due) and :meth:`close` when the
    worker stops. ``clock`` (wall-clock seconds) and ``background`` (run the
    gate in a thread) are there for tests.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        group: str,
        *,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.group = group
        self.every = float(settings.scoring.online_registry_every)
        self.background = background
        self._clock = clock
        self._registry: Registry | None = None
        self._looked_up = False  # the previous version (from the registry) is known
        self._previous: _Mark | None = None
        # the first version after a full interval of learning, not at the first batch: a
        # learner of a few batches is not worth a registry version nor a gate run
        self._due = clock() + self.every
        self._gate: threading.Thread | None = None
        #: The verdict of the last gate run (None before the first one or after a failure).
        self.last_gate: GateResult | None = None

    @property
    def prefix(self) -> str:
        """Checkpoint names of the group's learners start with this."""
        return f"online/{self.group}/"

    # ------------------------------------------------------------------ worker API

    def maybe_log(self, owned_sources: Collection[str]) -> int | None:
        """Log a new ``online`` version if one is due; its number, else None.

        Does nothing (and no I/O) when logging is off, when this worker does
        not own :data:`LEADER`, before ``online_registry_every`` seconds have
        passed since the last version, or while the last version's gate
        still runs. Never raises: errors are logged and retried later.
        """
        if self.every <= 0 or LEADER not in owned_sources:
            return None
        now = self._clock()
        if now < self._due or (self._gate is not None and self._gate.is_alive()):
            return None
        try:
            return self._log(now)
        except Exception as exc:  # the stream must outlive any store, registry or model error
            log.warning("online model not logged to the registry: %s", exc, exc_info=True)
            self._due = now + min(self.every, _RETRY)
            return None

    def wait(self, timeout: float | None = None) -> GateResult | None:
        """Wait for a running gate to finish; the last verdict."""
        if self._gate is not None:
            self._gate.join(timeout)
        return self.last_gate

    def close(self, timeout: float | None = 10.0) -> None:
        """Give a running gate ``timeout`` seconds to finish, then drop the registry connection.

        A gate still running after that is left to its daemon thread: if the
        process exits first, the version simply stays a challenger (the gate
        writes its audit record before it moves the champion alias).
        """
        self.wait(timeout)
        self._gate = None
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    # ------------------------------------------------------------------ one log

    def _open(self) -> Registry:
        if self._registry is None:
            from meterops.registry import Registry

            self._registry = Registry.from_settings(self.settings).open()
        return self._registry

    def _log(self, now: float) -> int | None:
        learners = self._learners(self.store.checkpoints(self.prefix))
        if not learners:  # nothing learned yet (or learners off): no need to open the registry
            self._due = now + min(self.every, _RETRY)
            return None
        registry = self._open()
        if not self._looked_up:
            self._previous = self._find_previous(registry)
            self._looked_up = True
            if self._previous is not None and now < self._previous.at + self.every:
                self._due = self._previous.at + self.every
                return None
        offsets = {source: offset for source, (_, offset) in learners.items()}
        previous = self._previous
        if previous is not None and dict(previous.offsets) == offsets:
            self._due = now + min(self.every, _RETRY)
            return None
        started = time.perf_counter()
        merged = self._merge(learners)
        if merged.rows_seen_ == 0 or merged.origin_ is None:  # still serving persistence
            self._due = now + min(self.every, _RETRY)
            return None
        since = {} if previous is None else dict(previous.offsets)
        sums = self._metric_sums(since, offsets)
        end = merged.origin_ + merged.freq_ * int(merged.learned_)  # the last reading learned
        start = merged.origin_  # the first log covers everything the learners saw
        if previous is not None and previous.end is not None:
            start = previous.end
        frame = self._recent(end, merged.freq_)
        if frame.empty:
            raise InputError(f"no stored readings up to {end} to test the online model on")
        data_range = {
            "start": str(start),
            "end": str(end),
            "rows": int(sums["n"]),
            "meters": int(frame.loc[frame["ts"] >= start, "meter_id"].nunique()),
        }
        version = self._register(registry, merged, offsets, sums, data_range, frame, now, started)
        self._previous = _Mark(version, now, offsets, end)
        self._due = now + self.every
        log.info(
            "online model of group %s (%d partitions) logged as version %d",
            self.group,
            len(learners),
            version,
        )
        if self.background:
            self._gate = threading.Thread(
                target=self._judge, args=(version, frame), name="online-gate", daemon=True
            )
            self._gate.start()
        else:
            self._judge(version, frame)
        return version

    def _find_previous(self, registry: Registry) -> _Mark | None:
        """The group's last logged version, from its tags (how a restarted worker resumes)."""
        found = registry.latest(_FAMILY, {"online_group": self.group})
        if found is None:
            return None
        tags = found.tags
        try:
            offsets = {str(k): int(v) for k, v in json.loads(tags["online_offsets"]).items()}
            at = float(tags.get("logged_at") or pd.Timestamp(found.created).timestamp())
            end = pd.Timestamp(tags["data_end"]) if tags.get("data_end") else None
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("version %d has unreadable online tags (%s)", found.version, exc)
            return None
        return _Mark(found.version, at, offsets, end)

    def _learners(self, checkpoints: Sequence[Checkpoint]) -> dict[str, _Learned]:
        """``source -> (model, next offset learned)`` of every readable, fitted checkpoint."""
        out: dict[str, _Learned] = {}
        for cp in checkpoints:
            source = cp.name.removeprefix(self.prefix)
            try:
                model = OnlineForecaster.from_state(unpack_state(cp.state))
            except (InputError, ValueError, KeyError, TypeError) as exc:
                log.warning("checkpoint %s not merged: %s", cp.name, exc)
                continue
            if model.is_fitted and source in cp.offsets:
                out[source] = (model, int(cp.offsets[source]))
        return out

    def _merge(self, learners: Mapping[str, _Learned]) -> OnlineForecaster:
        """All learners merged; if some cannot be, those that merge with the leader's (or largest).

        Learners can disagree when partitions see different covariates or
        after a change of hyper-parameters: a logged model is better than
        none, and the warning names the ones left out.
        """
        models = [model for model, _ in learners.values()]
        try:
            return OnlineForecaster.merge(models)
        except InputError as exc:
            ref = learners[LEADER][0] if LEADER in learners else max(models, key=_rows_seen)
            kept, left = [], []
            for source, (model, _) in learners.items():
                try:
                    OnlineForecaster.merge([ref, model])
                    kept.append(model)
                except InputError:
                    left.append(source)
            log.warning("online learners of %s left out of the merge (%s)", left, exc)
            return OnlineForecaster.merge(kept)

    def _metric_sums(self, since: Mapping[str, int], upto: Mapping[str, int]) -> dict[str, float]:
        """Sums of the online metrics rows each partition recorded between two checkpoints.

        A row's ``offset`` is where its learner stood before the batch (the
        offset of the checkpoint before it), so a partition's rows since the
        previous version are those with ``since <= offset < upto``. Rows are
        read newest first in growing pages until every partition's window is
        covered.
        """
        limit = _METRIC_ROWS
        while True:
            frame = self.store.online_metrics(model=ONLINE_LABEL, limit=limit)
            if len(frame) < limit or _covers(frame, since, upto):
                break
            limit *= 4
        low = frame["source"].map(lambda s: since.get(str(s), -math.inf))
        high = frame["source"].map(lambda s: upto.get(str(s), -math.inf))
        part = frame[(frame["offset"] >= low) & (frame["offset"] < high)]
        cols = ("n", "sse", "sae", "persistence_sse", "persistence_sae")
        return {c: float(pd.to_numeric(part[c]).fillna(0).sum()) for c in cols}

    def _recent(self, end: pd.Timestamp, freq: pd.Timedelta) -> pd.DataFrame:
        """The stored readings of the last :data:`GATE_HISTORY` up to ``end``."""
        frame = self.store.readings(start=end - GATE_HISTORY, end=end + freq).to_pandas()
        frame = frame[[c for c in frame.columns if not str(c).startswith("_")]]
        return frame.reset_index(drop=True)

    def _register(
        self,
        registry: Registry,
        model: OnlineForecaster,
        offsets: Mapping[str, int],
        sums: Mapping[str, float],
        data_range: Mapping[str, Any],
        frame: pd.DataFrame,
        now: float,
        started: float,
    ) -> int:
        from meterops.registry import Emissions, input_example

        reg = self.settings.registry
        n = sums["n"]
        metrics: dict[str, float] = {"prequential_n": n}
        if n > 0:
            metrics |= {
                "prequential_rmse": math.sqrt(sums["sse"] / n),
                "prequential_mae": sums["sae"] / n,
                "prequential_persistence_rmse": math.sqrt(sums["persistence_sse"] / n),
                "prequential_persistence_mae": sums["persistence_sae"] / n,
            }
        ordered = dict(sorted(offsets.items()))
        lineage = {
            "source": "stream",
            "group": self.group,
            "checkpoint_offsets": ordered,
            "store": redact_url(self.settings.backends.store),
            "bus": redact_url(self.settings.backends.bus),
        }
        learned = json.dumps({"group": self.group, "offsets": ordered}, sort_keys=True)
        # no CodeCarbon run: the learning happened in the workers, batch by batch
        emissions = Emissions(
            0.0, 0.0, time.perf_counter() - started, reg.carbon_country, "not-measured"
        )
        return registry.log_training_run(
            model,
            {"source": "stream", "group": self.group, "partitions": len(offsets)},
            {int(model.horizon_): metrics},
            data_range,
            "sha256:" + hashlib.sha256(learned.encode()).hexdigest(),
            emissions,
            input_example(frame),
            lineage=lineage,
            tags={
                "online_group": self.group,
                "online_offsets": json.dumps(ordered),
                "data_end": str(data_range["end"]),
                "logged_at": repr(now),
                # the folds the gate re-runs both recipes on (as for a trained model)
                "backtest": json.dumps({"folds": reg.folds, "test_fraction": 0.3, "seed": 0}),
            },
        )

    def _judge(self, version: int, data: pd.DataFrame) -> None:
        """The registry's champion gate on ``version``, with ``data`` for the re-run."""
        from meterops.registry import Registry

        reg = self.settings.registry
        try:
            with Registry.from_settings(self.settings) as registry:
                verdict = registry.gate(
                    version, metric=reg.gate_metric, margin=reg.gate_margin, data=data
                )
        except Exception as exc:  # a failed gate leaves the version a challenger, nothing worse
            log.warning("gate of online version %d failed: %s", version, exc, exc_info=True)
            self.last_gate = None
            return
        self.last_gate = verdict
        log.info("%s", verdict.reason)


def _covers(frame: pd.DataFrame, since: Mapping[str, int], upto: Mapping[str, int]) -> bool:
    """True when ``frame`` reaches back to every partition's previous checkpoint."""
    oldest = frame.groupby("source")["offset"].min()
    return all(
        source in since and source in oldest.index and int(oldest[source]) <= since[source]
        for source in upto
    )


def _rows_seen(model: OnlineForecaster) -> int:
    return int(model.rows_seen_)
