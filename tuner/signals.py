"""SIGTERM as an orderly stop: the record being written is finished, Ray is stopped, the run says
it can be resumed and exits 143 (128 + SIGTERM, what a shell reports for a TERM-ended job).

``install`` makes SIGTERM raise ``Terminated`` in the main thread, which unwinds the command
through its ``finally`` blocks (compile services closed, actors killed, ``ray.shutdown``).
Code that must not be cut in half (a journal append: one line, fsynced) runs inside
``deferred()``: a SIGTERM arriving there is held and raised when the block ends. Ray installs its
own SIGTERM handler in ``ray.init`` (it exits through a crash-looking dump), so
``tuner.ray_session`` puts this one back (``restore``) after starting Ray, and turns Ray's exit
during ``ray.init`` (``SystemExit(15)``) into ``Terminated`` (``arrived_elsewhere``).

Where the signal lands decides what the exception looks like. In Python code it is
``Terminated``. Inside a call into Ray's compiled core (``ray.wait``/``ray.get`` run Python's
signal handlers from C while they wait), the handler's ``Terminated`` is left pending and Ray's
call ends in ``SystemError: ... returned a result with an exception set`` whose ``__context__``
is the ``Terminated``; best-effort code that catches ``Exception`` might even swallow that. So
the handler also sets a flag, and termination is recognised by the flag, not by the exception's
type: ``caused(exc)`` at the command's top level, ``check()`` in every waiting loop (so a
swallowed one still stops the run within one wait). A second SIGTERM while the stop is under way
is ignored, so it cannot cut the clean-up short.

SIGINT (Ctrl-C) stays Python's ``KeyboardInterrupt`` (exit 130), but is flagged the same way: a
``KeyboardInterrupt`` raised where Python only reports and ignores it (an at-fork handler while
Ray starts its processes: the run went on to the end and exited 0) or inside Ray's compiled core
(a SystemError that a candidate's ``except Exception`` took for the candidate's failure) still
ends the command at the next ``check()``.
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


_received = False
_interrupted = False
_held = 0
_pending = False


def _handler(signum: int, frame: object) -> None:
    global _received, _pending
    if _received:
        return  # the orderly stop is under way
    _received = True
    if _held:
        _pending = True
        return
    raise Terminated()


def _interrupt_handler(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGTERM to ``Terminated`` and flag SIGINT for a new command (forgetting an earlier
    command's signals in this process). Only the main thread may set signal handlers; elsewhere a
    no-op. SIGINT is left alone where it is ignored (a job started in the background by a shell)."""
    global _received, _interrupted, _pending
    if threading.current_thread() is threading.main_thread():
        _received = _interrupted = _pending = False
        signal.signal(signal.SIGTERM, _handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt_handler)


def restore() -> None:
    """Put the handler back after a library replaced it (``ray.init``), keeping a SIGTERM already received."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def arrived_elsewhere() -> Terminated:
    """Record a SIGTERM that another handler caught (Ray's, active while ``ray.init`` runs, exits
    with the signal's number); returns the ``Terminated`` to raise in its place."""
    global _received
    _received = True
    return Terminated()


def received() -> bool:
    """True once SIGTERM arrived during this command."""
    return _received


def interrupted() -> bool:
    """True once SIGINT arrived during this command."""
    return _interrupted


def check() -> None:
    """Raise ``Terminated`` if SIGTERM arrived (and is not being held), ``KeyboardInterrupt`` if
    SIGINT did: for loops that wait on Ray, where the exception raised by the handler may have
    been swallowed or converted."""
    global _pending
    if _received and not _held:
        _pending = False
        raise Terminated()
    if _interrupted:
        raise KeyboardInterrupt


def caused(exc: BaseException) -> bool:
    """Whether ``exc`` ends the command because of SIGTERM: a ``Terminated`` itself or in its
    ``__cause__``/``__context__`` chain, or any exception raised after SIGTERM arrived."""
    return _received or _terminated_in(exc) is not None


def hint_of(exc: BaseException) -> str:
    """The resume hint a ``Terminated`` in ``exc``'s chain carries ("" when none)."""
    found = _terminated_in(exc)
    return found.hint if found is not None else ""


def _terminated_in(exc: BaseException) -> Terminated | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, Terminated):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


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
