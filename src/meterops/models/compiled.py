"""Compiled tree inference for the stream: LightGBM boosters as native code (lleaves).

Why: the champion scores every reading with four boosters per horizon (mean
and three quantiles, 100 to 200 trees each), and LightGBM's own predictor
was the largest single cost of a worker. lleaves compiles a booster's
trees into straight-line native code with LLVM; on the bench champion it
predicts 3 to 4 times faster, with the same numbers (the same
comparisons in float64; max difference about 1e-15, checked in
``tests/unit/test_compiled.py``).

Compiling costs about 1.5 s per 200-tree booster (function inlining off:
3.5 times quicker to compile, 15 % slower to run), so it never blocks: the
worker keeps scoring with LightGBM while a thread compiles, and switches
when all of a model's boosters are ready. The shared objects are cached by
the hash of the booster's text, so a restarted or rebalanced worker, or a
second worker on the same machine, loads them at once; a stale cache entry
is impossible because the key is the model itself.

lleaves is optional (the ``fast`` extra); without it, or when a compile
fails, LightGBM serves and a warning says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

__all__ = ["CompiledBoosters", "Predictor", "cache_dir", "compile_booster", "cores_reserved"]

log = logging.getLogger("meterops.models")

Predictor = Callable[[npt.NDArray[np.floating]], npt.NDArray[np.float64]]
_PARALLEL_ROWS = 20_000  # below this, one thread: starting threads costs more than it saves
_reserved = [0]  # cores kept busy by other threads of this process (see cores_reserved)
_reserved_lock = threading.Lock()


@contextlib.contextmanager
def cores_reserved(cores: int = 1) -> Iterator[None]:
    """While inside, compiled predictions leave ``cores`` cores to other threads.

    The pipelined worker's writer thread keeps about one core busy; a
    second lleaves thread on a 2-core machine then only contends with it
    (the bench's 480,000-reading drain, mean of three: 50,300 readings/s
    with one lleaves thread, 46,800 with two).
    """
    with _reserved_lock:
        _reserved[0] += cores
    try:
        yield
    finally:
        with _reserved_lock:
            _reserved[0] -= cores


def cache_dir() -> Path:
    """The machine's compile cache: ``$METEROPS_CACHE_DIR`` or the XDG cache directory.

    Per machine, not per project: the key is the model's own text, so every
    project and worker here can share what one of them compiled.
    """
    explicit = os.environ.get("METEROPS_CACHE_DIR")
    if explicit:
        return Path(explicit) / "compiled"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meterops" / "compiled"


def compile_booster(booster: lgb.Booster, cache_dir: Path) -> Predictor:
    """A native predictor of ``booster`` (raw scores), compiled or loaded from ``cache_dir``.

    Raises ImportError without lleaves; compile errors propagate.
    """
    import lleaves

    text = booster.model_to_string()
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = cache_dir / f"{key}.txt"
    if not source.exists():
        _write_atomically(source, text)
    model = lleaves.Model(model_file=str(source))
    library = cache_dir / f"{key}.so"
    if library.exists():
        model.compile(cache=str(library), finline=False)
    else:
        # compile to a private name, then rename: a concurrent worker never loads half a file
        partial = cache_dir / f"{key}.{os.getpid()}.{threading.get_ident()}.so"
        model.compile(cache=str(partial), finline=False)
        partial.replace(library)
    threads = max(1, min(4, os.cpu_count() or 1))

    def predict(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        jobs = max(1, threads - _reserved[0]) if len(x) >= _PARALLEL_ROWS else 1
        return np.asarray(model.predict(x, n_jobs=jobs), dtype=np.float64)

    return predict


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_text(text)
    partial.replace(path)


class CompiledBoosters:
    """Compiles sets of boosters in a background thread; :meth:`get` serves the finished ones.

    ``boosters`` maps a key (a horizon) to the named boosters serving it. A
    key's predictors appear all together, once every booster of it is
    compiled, so a forecast never mixes compiled and LightGBM quantiles.
    """

    def __init__(self, boosters: Mapping[int, Mapping[str, lgb.Booster]], cache_dir: Path) -> None:
        self._ready: dict[int, dict[str, Predictor]] = {}
        self.done = threading.Event()
        self._thread = threading.Thread(
            target=self._compile_all,
            args=({k: dict(v) for k, v in boosters.items()}, cache_dir),
            name="compile-boosters",
            daemon=True,
        )
        self._thread.start()

    def _compile_all(self, boosters: dict[int, dict[str, lgb.Booster]], cache_dir: Path) -> None:
        try:
            for key, named in boosters.items():
                self._ready[key] = {t: compile_booster(b, cache_dir) for t, b in named.items()}
        except ImportError:
            log.info("lleaves is not installed: LightGBM serves (install meterops[fast])")
        except Exception as exc:  # a compiler failure must leave LightGBM serving
            log.warning("compiling the champion's boosters failed (%s): LightGBM serves", exc)
        finally:
            self.done.set()

    def get(self, key: int) -> Mapping[str, Predictor] | None:
        """The compiled predictors of ``key``, or None while they are not all ready."""
        return self._ready.get(key)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compiling ended (done or given up); False on timeout."""
        return self.done.wait(timeout)
