"""A pool of compile processes with a deadline per job: a compile that never ends costs one job.

Why processes and not threads: Triton's compiler holds the GIL for much of its work and some
compiles never finish (the issue saw them on Triton 3.6); a hung thread cannot be stopped, a
process can. Each process runs one job at a time; a supervisor thread hands out jobs in
submission order — every ordinary job before any speculative one (``submit(...,
speculative=True)``: a config the caller only expects to need; ``promote`` makes it ordinary once
it is needed), so speculation never delays a job already needed, beyond the one compile a
process may be running when it arrives — collects results, kills a process whose job outlives ``timeout_s`` (the job is
reported as ``timeout``) and starts a fresh one in its place. A process that dies on its own
(a segfault in the compiler) reports its job as ``crashed``, and so does a job function that raises.

The job function runs in the child and must be importable by reference (the ``spawn`` start
method: forking a process that runs Ray's threads is unsafe); so must the job and its result.
What a job returns is the job function's business; the pool adds only the two failures above.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from workers.records import Status

SUPERVISOR_TICK_S = 0.05


@dataclass(frozen=True)
class PoolFailure:
    """A job the pool had to give up on: its process hung (``timeout``) or died (``crashed``)."""

    status: Status
    message: str
    seconds: float


def _serve(connection: Connection, job_fn: Callable[[Any], Any], setup: Callable[[], None] | None) -> None:
    """The child's loop: receive (key, job), send back (key, result, seconds), until told to stop."""
    if setup is not None:
        setup()
    while True:
        try:
            item = connection.recv()
        except EOFError:
            return
        if item is None:
            return
        key, job = item
        started = time.monotonic()
        try:
            result = job_fn(job)
        except Exception as exc:  # noqa: BLE001 - the job function's own bug: reported, the process lives on
            result = PoolFailure(Status.CRASHED, f"{type(exc).__name__}: {exc}"[:500], time.monotonic() - started)
        connection.send((key, result, time.monotonic() - started))


@dataclass
class _Process:
    process: multiprocessing.process.BaseProcess
    connection: Connection
    key: Hashable | None = None
    started: float = 0.0


class CompilePool:
    """``submit(key, job)``; ``results(timeout_s)`` returns ``[(key, result or PoolFailure, seconds)]``."""

    def __init__(self, job_fn: Callable[[Any], Any], processes: int, timeout_s: float,
                 setup: Callable[[], None] | None = None) -> None:
        if processes < 1:
            raise ValueError(f"need at least one compile process, got {processes}")
        self._context = multiprocessing.get_context("spawn")
        self._job_fn = job_fn
        self._setup = setup
        self.timeout_s = timeout_s
        self._waiting: deque[tuple[Hashable, Any]] = deque()
        self._speculative: dict[Hashable, Any] = {}  # insertion-ordered: handed out oldest first
        self._promoted: set[Hashable] = set()  # promoted before their speculative submission arrived
        self._submitted: set[Hashable] = set()
        self._lock = threading.Lock()
        self._results: queue.Queue[tuple[Hashable, Any, float]] = queue.Queue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._processes = [self._start() for _ in range(processes)]
        self._supervisor = threading.Thread(target=self._supervise, name="compile-pool", daemon=True)
        self._supervisor.start()

    @property
    def size(self) -> int:
        return len(self._processes)

    def submit(self, key: Hashable, job: Any, speculative: bool = False) -> None:
        """Queue ``job``; a ``speculative`` one runs only while no ordinary job waits."""
        with self._lock:
            self._submitted.add(key)
            if speculative and key not in self._promoted:
                self._speculative[key] = job
            else:
                self._promoted.discard(key)
                self._waiting.append((key, job))

    def promote(self, key: Hashable) -> None:
        """The speculative job ``key`` is needed now: it joins the ordinary jobs (at their end). A
        job already running or done is left alone; one not submitted yet will be ordinary."""
        with self._lock:
            if key in self._speculative:
                self._waiting.append((key, self._speculative.pop(key)))
            elif key not in self._submitted:
                self._promoted.add(key)

    def drop_waiting(self) -> list[Hashable]:
        """Forget every job no process has started (ordinary and speculative) and every promotion
        still waiting for its job's submission: the keys of the jobs, in submission order
        (ordinary ones first). Running jobs finish and report as usual; a key dropped here may be
        submitted again, as what it is submitted as."""
        with self._lock:
            keys = [key for key, _ in self._waiting] + list(self._speculative)
            self._waiting.clear()
            self._speculative.clear()
            self._promoted.clear()
            self._submitted.difference_update(keys)
        return keys

    def results(self, timeout_s: float = 0.0) -> list[tuple[Hashable, Any, float]]:
        """Everything finished so far; waits up to ``timeout_s`` for the first one if none is."""
        out = []
        try:
            out.append(self._results.get(timeout=timeout_s) if timeout_s > 0 else self._results.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop every process at once: idle ones are told to end, busy ones (whose jobs nobody
        waits for any more) are killed — Triton writes its cache files whole (temporary file,
        then rename), so a killed compile leaves nothing half-written. Waits at most about
        ``timeout_s`` in all, then kills what is left. A second call waits for the first."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._stop(timeout_s)

    def _stop(self, timeout_s: float) -> None:
        self._supervisor.join(timeout=5)
        for proc in self._processes:
            if proc.key is not None:
                proc.process.kill()
                continue
            try:
                proc.connection.send(None)
            except (OSError, BrokenPipeError):
                proc.process.kill()
        deadline = time.monotonic() + timeout_s
        for proc in self._processes:
            proc.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._processes:
            if proc.process.is_alive():
                proc.process.kill()
                proc.process.join(timeout=1)

    # -- supervisor ----------------------------------------------------------------------------

    def _start(self) -> _Process:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self._job_fn, self._setup), daemon=True,
                                        name="moe-tune-compile")
        process.start()
        child.close()
        return _Process(process, parent)

    def _supervise(self) -> None:
        while not self._closed:
            self._hand_out()
            busy = {p.connection: p for p in self._processes if p.key is not None}
            if not busy:
                time.sleep(SUPERVISOR_TICK_S)
                continue
            for connection in wait(list(busy), timeout=SUPERVISOR_TICK_S):
                self._collect(busy[connection])
            self._end_overdue()

    def _hand_out(self) -> None:
        with self._lock:
            for i, proc in enumerate(self._processes):
                if proc.key is None and (self._waiting or self._speculative):
                    speculative = not self._waiting
                    if speculative:
                        key = next(iter(self._speculative))
                        job = self._speculative.pop(key)
                    else:
                        key, job = self._waiting.popleft()
                    try:
                        proc.connection.send((key, job))
                    except (OSError, BrokenPipeError):
                        if speculative:  # back at the head of its own queue
                            self._speculative = {key: job, **self._speculative}
                        else:
                            self._waiting.appendleft((key, job))
                        self._replace(i)
                        continue
                    proc.key, proc.started = key, time.monotonic()

    def _collect(self, proc: _Process) -> None:
        try:
            key, result, seconds = proc.connection.recv()
        except (EOFError, OSError):
            self._fail(proc, Status.CRASHED, f"compile process died (exit code {proc.process.exitcode})")
            return
        with self._lock:
            proc.key = None
        self._results.put((key, result, seconds))

    def _end_overdue(self) -> None:
        now = time.monotonic()
        for proc in self._processes:
            if proc.key is not None and now - proc.started > self.timeout_s:
                self._fail(proc, Status.TIMEOUT, f"compile ran past {self.timeout_s:g}s; its process was killed")

    def _fail(self, proc: _Process, status: Status, message: str) -> None:
        key, seconds = proc.key, time.monotonic() - proc.started
        with self._lock:
            self._replace(self._processes.index(proc))
        self._results.put((key, PoolFailure(status, message, seconds), seconds))

    def _replace(self, index: int) -> None:
        """Kill the process at ``index`` (it hung or died) and start a fresh one there. Lock held."""
        old = self._processes[index]
        if old.process.is_alive():
            old.process.kill()
        old.process.join(timeout=5)
        old.connection.close()
        self._processes[index] = self._start()
