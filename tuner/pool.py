"""The Ray actors that measure, and the bookkeeping that makes their failures attributable.

Each actor holds one GPU and runs calls in submission order. The pool keeps at most
``INFLIGHT_PER_WORKER`` calls in flight per actor: enough that the next candidate is already
waiting when one finishes, few enough that when an actor dies the culprit is known exactly (the
oldest call in flight is the one that was running; the others never started and go back to the
queue uncharged). Why one candidate per call rather than batches: a batch lost with its actor
would hide which of its candidates killed it.

Deaths: a worker ends its own process on a poisoned CUDA context or a hang (its watchdog); the
pool also kills an actor whose oldest call is overdue by ``OVERDUE_GRACE_S`` beyond the
per-candidate timeout (a hang the watchdog could not end). Ray restarts the process
(``max_restarts=-1``, ``max_task_retries=0``: retries are the engine's decision, not Ray's);
the pool pings the restarting actor every ``PROBE_INTERVAL_S`` (calls to an actor that is
restarting fail at once) and gives it work again once a ping returns; an actor Ray declares dead,
or that is not back within ``RESTART_TIMEOUT_S`` (a lost node), is retired.

A worker raising ``workers.failures.InputChanged`` (a pinned routing file changed during the
run) ends the run (RunFailed naming the file), whichever caller polled it.

This module is the one owner of GPU actors: ``start_pool`` creates them (inside a
``tuner.ray_session``) for the tuner's engine, for ``bench`` and for ``compare``'s accuracy pass,
so restarts, probing and overdue handling exist once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnschedulableError, GetTimeoutError, RayActorError

from tuner import signals
from tuner.errors import RunFailed
from workers.failures import describe, input_changed
from workers.records import Status

INFLIGHT_PER_WORKER = 2
OVERDUE_GRACE_S = 60.0
PROBE_INTERVAL_S = 1.0
STARTUP_TIMEOUT_S = 600.0
RESTART_TIMEOUT_S = 180.0
"""A lost actor not answering a ping within this many seconds of its death is retired (Ray may
queue the ping until the restart, so a stuck restart is bounded here, not by the ping)."""


@dataclass
class Flight:
    ref: Any
    task: Any
    submitted: float


@dataclass
class Slot:
    """One actor and what it is doing."""

    index: int
    actor: Any
    env: dict[str, str] = field(default_factory=dict)
    pending: deque[Flight] = field(default_factory=deque)
    last_done: float = 0.0
    probing: Flight | None = None
    probe_at: float | None = None
    lost_since: float | None = None
    killed_overdue: bool = False
    retired: bool = False
    last_group: Any = None

    @property
    def device(self) -> str:
        return self.env.get("device", "")

    def head_started(self) -> float:
        """When the oldest call in flight began running (calls run one after another)."""
        return max(self.pending[0].submitted, self.last_done)


@dataclass
class Done:
    slot: Slot
    task: Any
    value: Any


@dataclass
class Lost:
    """A call that never returned because its actor died. ``culprit``: it was the one running."""

    slot: Slot
    task: Any
    culprit: bool
    cause: Status
    detail: str

    @property
    def reason(self) -> str:
        """One line saying why the call failed."""
        return self.detail


@dataclass
class Raised:
    """The actor method raised (the actor is alive)."""

    slot: Slot
    task: Any
    error: BaseException

    @property
    def reason(self) -> str:
        """One line saying why the call failed: the method's own exception (a Ray task error's
        ``cause``) as ``Type: first line of its message``, not Ray's traceback."""
        return describe(getattr(self.error, "cause", None) or self.error)


class WorkerPool:
    def __init__(self, actors: list[Any], timeout_s: float, note: Callable[[str], None],
                 restart_timeout_s: float = RESTART_TIMEOUT_S) -> None:
        self.slots = [Slot(index=i, actor=a) for i, a in enumerate(actors)]
        self.timeout_s = timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.note = note

    # -- start-up ------------------------------------------------------------------------------

    def describe_all(self) -> None:
        """Ask every actor what it is; an actor that cannot start ends the run with its reason."""
        refs = [slot.actor.describe.remote() for slot in self.slots]
        try:
            envs = ray.get(refs, timeout=STARTUP_TIMEOUT_S)
        except GetTimeoutError:
            raise WorkerStartFailed(f"workers did not start within {STARTUP_TIMEOUT_S:.0f}s "
                                    "(GPUs busy elsewhere, or the cluster cannot place them)") from None
        except (RayActorError, ActorUnschedulableError) as exc:
            raise WorkerStartFailed(f"a worker could not start: {_root_cause(exc)}") from None
        for slot, env in zip(self.slots, envs):
            slot.env = env

    # -- dispatch ------------------------------------------------------------------------------

    def live_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired]

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if not s.retired and s.lost_since is None and len(s.pending) < INFLIGHT_PER_WORKER]

    def submit(self, slot: Slot, task: Any, call: Callable[[Any], Any]) -> None:
        """Start ``call(actor)`` (returning an ObjectRef) for ``task`` on ``slot``."""
        slot.pending.append(Flight(call(slot.actor), task, time.monotonic()))

    def call(self, task: Any, invoke: Callable[[Any], Any], wait_s: float = 0.5) -> Done | Lost | Raised:
        """Run one call on the first actor free to take it and wait for its outcome, for callers
        that run calls one at a time (``bench``, ``compare``'s accuracy pass): an actor lost before
        is given time to come back first. Raises RunFailed when every actor is gone."""
        if self.busy():
            raise RuntimeError("WorkerPool.call runs one call at a time; calls are already in flight")
        while not self.free_slots():
            if not self.live_slots():
                raise RunFailed("every GPU worker was lost")
            self.poll(wait_s)
        self.submit(self.free_slots()[0], task, invoke)
        while True:
            for event in self.poll(wait_s):
                return event

    def busy(self) -> bool:
        """Calls in flight (their results are still to come)."""
        return any(s.pending for s in self.slots)

    def recovering(self) -> bool:
        """Actors lost and not yet back or retired: only ``poll`` pings them back into service, so
        a caller with nothing in flight must keep polling while this is true."""
        return any(s.lost_since is not None and not s.retired for s in self.slots)

    # -- collection ----------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> list[Done | Lost | Raised]:
        """Wait up to ``timeout_s`` for results; return every event that happened, in call order per actor."""
        self._kill_overdue()
        self._send_due_probes()
        refs = [f.ref for s in self.slots for f in s.pending]
        refs += [s.probing.ref for s in self.slots if s.probing is not None]
        if not refs:
            if any(s.probe_at is not None for s in self.slots):
                time.sleep(min(timeout_s, PROBE_INTERVAL_S))
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready_set = set(ready)
        events: list[Done | Lost | Raised] = []
        for slot in self.slots:
            if slot.probing is not None and slot.probing.ref in ready_set:
                self._finish_probe(slot)
            while slot.pending and slot.pending[0].ref in ready_set:
                events.extend(self._collect_head(slot))
        return events

    def _collect_head(self, slot: Slot) -> list[Done | Lost | Raised]:
        flight = slot.pending[0]
        now = time.monotonic()
        try:
            value = ray.get(flight.ref)
        except RayActorError:
            return self._actor_died(slot, now)
        except Exception as exc:  # noqa: BLE001 - the method raised; the actor lives
            signals.check()  # or a SIGTERM surfaced inside ray.get: not the candidate's failure
            slot.pending.popleft()
            slot.last_done = now
            changed = input_changed(exc)
            if changed is not None:
                raise RunFailed(changed) from None
            return [Raised(slot, flight.task, exc)]
        slot.pending.popleft()
        slot.last_done = now
        return [Done(slot, flight.task, value)]

    def _actor_died(self, slot: Slot, now: float) -> list[Lost]:
        # A death after the timeout is the watchdog's (or ours); earlier, a crash. Ray reports a
        # death a second or two late, which only matters for timeouts far below the default.
        elapsed = now - slot.head_started()
        timed_out = slot.killed_overdue or elapsed >= self.timeout_s
        cause = Status.TIMEOUT if timed_out else Status.CRASHED
        detail = (f"worker {slot.index} ran past the {self.timeout_s:g}s timeout" if timed_out
                  else f"worker {slot.index}'s process died during the call")
        flights = list(slot.pending)
        slot.pending.clear()
        slot.killed_overdue = False
        slot.last_done = now
        self.note(f"worker {slot.index} ({slot.device}) lost while running a candidate ({cause.value}); restarting it")
        self._probe(slot)
        return [Lost(slot, f.task, culprit=(i == 0), cause=cause, detail=detail) for i, f in enumerate(flights)]

    def _probe(self, slot: Slot, delay_s: float = 0.0) -> None:
        """Ping the (restarting) actor after ``delay_s``; it gets work again once a ping returns."""
        if slot.lost_since is None:
            slot.lost_since = time.monotonic()
        slot.probing = None
        slot.probe_at = time.monotonic() + delay_s

    def _send_due_probes(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.lost_since is not None and not slot.retired and now - slot.lost_since > self.restart_timeout_s:
                self._retire(slot, f"it did not restart within {self.restart_timeout_s:.0f}s")
                _kill_quietly(slot.actor)
                continue
            if slot.probe_at is not None and slot.probing is None and now >= slot.probe_at:
                slot.probe_at = None
                slot.probing = Flight(slot.actor.ping.remote(), None, now)

    def _finish_probe(self, slot: Slot) -> None:
        try:
            ray.get(slot.probing.ref)
        except ActorDiedError as exc:
            self._retire(slot, f"it is dead: {_root_cause(exc)}")
            return
        except RayActorError:
            # Still restarting: calls to a restarting actor fail at once, so ask again shortly.
            if time.monotonic() - slot.lost_since > self.restart_timeout_s:
                self._retire(slot, f"it did not restart within {self.restart_timeout_s:.0f}s")
            else:
                self._probe(slot, PROBE_INTERVAL_S)
            return
        slot.probing = None
        slot.lost_since = None
        slot.last_done = time.monotonic()

    def _retire(self, slot: Slot, reason: str) -> None:
        slot.probing = None
        slot.probe_at = None
        slot.retired = True
        self.note(f"worker {slot.index} is gone ({reason}); continuing without it")

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        limit = self.timeout_s + OVERDUE_GRACE_S
        for slot in self.slots:
            if slot.pending and not slot.killed_overdue and now - slot.head_started() > limit:
                slot.killed_overdue = True
                self.note(f"worker {slot.index} overdue by more than {OVERDUE_GRACE_S:.0f}s; killing it")
                ray.kill(slot.actor, no_restart=False)

    def shutdown(self) -> None:
        for slot in self.slots:
            _kill_quietly(slot.actor)


def _kill_quietly(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - best effort; the actor may be gone already
        pass


class WorkerStartFailed(RuntimeError):
    """The actors could not be created or did not answer."""


def start_pool(workers: int | None, kernel: str, timeout_s: float, note: Callable[[str], None]) -> WorkerPool:
    """One ``BenchmarkWorker`` actor per GPU Ray reports (at most ``workers``), each told what it
    is (``describe``). Needs an open ``tuner.ray_session``; raises RunFailed when Ray has no GPU
    or an actor cannot start."""
    from workers.worker import BenchmarkWorker

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise RunFailed("Ray reports no GPUs (on a machine without one, use --interpret)")
    count = min(gpus, workers) if workers else gpus
    actor_class = ray.remote(BenchmarkWorker).options(num_gpus=1, max_restarts=-1, max_task_retries=0)
    actors = [actor_class.remote(kernel=kernel, timeout_s=timeout_s) for _ in range(count)]
    pool = WorkerPool(actors, timeout_s, note)
    try:
        pool.describe_all()
    except WorkerStartFailed as exc:
        pool.shutdown()
        raise RunFailed(str(exc)) from None
    return pool


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("RuntimeError:", "ServerKernelUnavailable:", "ModuleNotFoundError:", "ImportError:")):
            return line
    return (text.splitlines() or [type(exc).__name__])[0][:300]
