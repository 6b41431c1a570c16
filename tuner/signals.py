"""SIGTERM as an orderly stop: the record being written is finished, Ray is stopped, the run says
it can be resumed and exits 143 (128 + SIGTERM, what a shell reports for a TERM-ended job).

``install`` makes SIGTERM raise ``Terminated`` in the main thread, which unwinds the command
through its ``finally`` blocks (compile services closed, actors killed, ``ray.shutdown``).
Code that must not be cut in half (a journal append: one line, fsynced) runs inside
``deferred()``: a SIGTERM arriving there is held and raised when the block ends. Ray installs its
own SIGTERM handler in ``ray.init`` (it exits through a crash-looking dump), so
``tuner.ray_session`` installs this one again after starting Ray.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_CODE = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so ``except Exception`` in
    best-effort code does not swallow it. ``hint`` says how to resume (set by the command)."""

    def __init__(self, hint: str = "") -> None:
        super().__init__("terminated by SIGTERM")
        self.hint = hint


_held = 0
_pending = False


def _handler(signum: int, frame: object) -> None:
    global _pending
    if _held:
        _pending = True
        return
    raise Terminated()


def install() -> None:
    """Route SIGTERM to ``Terminated`` (only the main thread may set signal handlers; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a SIGTERM until the block ends (then raise it)."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            _pending = False
            raise Terminated()
