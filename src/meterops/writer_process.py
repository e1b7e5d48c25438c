"""The worker's writer in a process of its own: ``python -m meterops.writer_process IN OUT``.

A worker on the embedded store scores a micro-batch while the previous one
is written; both halves are mostly Python (SQLite binds every value of every
row through the interpreter), so as two threads they share one GIL and
overlap little. In a child process the write runs on the other core.

The parent (:class:`meterops.pipeline.ProcessWriter`) sends the settings over
the pipe ``IN``, then, one micro-batch at a time, the path of a pickled
:class:`~meterops.pipeline.Prepared` (a file in a memory-backed spool
directory). This process stores each with
:func:`~meterops.pipeline.store_prepared`, retried like the worker's own
writes, and answers on ``OUT``: first ``("ready", None, 0)`` once its
connections are open, then ``("ok", stats, retries)`` or
``("error", exception, retries)`` per batch.

Offsets are still committed by the parent, after the answer. This process
ignores Ctrl-C and SIGTERM (see :func:`main`); when the parent exits or dies
(``kill -9`` included) the pipe closes and this process exits after the
write in hand, which the store's idempotent write makes harmless: the batch
is redelivered to the next worker.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from meterops.pipeline import Pipeline, retrying, store_prepared

__all__ = ["main", "serve"]

log = logging.getLogger("meterops.worker")


def serve(inbox: Connection, outbox: Connection) -> None:
    """Write what arrives on ``inbox`` until it closes; answer each on ``outbox``."""
    settings = inbox.recv()
    retries = [0]

    def count() -> None:
        retries[0] += 1

    with Pipeline(settings) as pipe:
        pipe.store, pipe.lake, pipe.producer  # noqa: B018 - open them before the first batch
        outbox.send(("ready", None, 0))
        while True:
            try:
                path = Path(inbox.recv())
            except EOFError:  # the worker closed the pipe, or died
                return
            retries[0] = 0
            reply: tuple[Any, ...]
            try:
                prepared = pickle.loads(path.read_bytes())  # noqa: S301 - our parent wrote it
                path.unlink()
                stats = retrying(
                    settings.worker.retry_for,
                    "store",
                    lambda: store_prepared(pipe, prepared),  # noqa: B023 - called at once
                    count,
                )
                reply = ("ok", stats, retries[0])
            except Exception as exc:  # the parent re-raises it
                reply = ("error", exc, retries[0])
            try:
                _answer(outbox, reply)
            except BrokenPipeError:
                return


def _answer(outbox: Connection, reply: tuple[Any, ...]) -> None:
    """Send ``reply``; an exception that cannot be pickled goes as its text."""
    try:
        outbox.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError):
        kind, exc, retries = reply
        outbox.send((kind, RuntimeError(f"{type(exc).__name__}: {exc}"), retries))


def main(argv: list[str]) -> None:
    """Serve the pipes ``argv[0]`` (in) and ``argv[1]`` (out); the spool dir ``argv[2]``
    is removed on the way out, should the parent have died without removing it.

    Ctrl-C and SIGTERM reach the whole process group; the worker answers them
    by finishing its pending write, which needs this process alive. So they
    are ignored here: this process ends when its pipe closes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="meterops writer: %(message)s")
    try:
        serve(Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False))
    finally:
        shutil.rmtree(argv[2], ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
