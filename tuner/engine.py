"""The search engine: one shared work queue over the pool's actors, per device group.

Per device group (the actors of one worker environment: device name, versions, kernel hash —
results of different GPU types are never mixed) the strategy proposes candidates; those already
in the journal are answered from it; the rest go on one shared queue, from which every idle actor
takes the next candidate, preferring one of the (shape, routing, M) it holds a problem for (so
setup is done once per group, and no GPU idles while work remains). Results are journaled as
they arrive. ``Retimer`` re-times the finalists of one device group back to back (``tuner.select``),
compiling ahead first those this run has not compiled.

Compile-ahead (``tuner.compiling``): on a GPU, a candidate whose config is not compiled yet waits
off the queue while CPU processes on its node compile it; compile errors, out-of-resources and
compile time-outs found there are recorded as the candidate's outcome and never reach a GPU.
Two things keep compiling off the GPUs' critical path: a worker with nothing in flight and no
compiled candidate to take gets the oldest candidate still compiling (preferring the batch size
whose problem it holds) and compiles it itself, as it always could — its own outcome then stands,
whatever compile-ahead says later; and while the compile services have processes no job waits
for, the strategy's likely next configs (``Strategy.likely_next``) are compiled speculatively at
the lowest priority (``CompileAhead.speculate``), so a round is often compiled before it is
proposed. Neither changes what the strategy proposes: only where and when configs compile.
A time budget (``budget_s``), counted from the first candidate handed to a GPU, stops the search
where it is: nothing more is proposed or queued, calls in flight finish. When no worker is left
the engine stops (``workers_lost``) and the caller writes what finished.

Retries are the engine's, not Ray's: a candidate whose actor died (crash, poisoned CUDA context,
hang) is retried once on another actor and quarantined (``crashed`` / ``timeout``) if it fails
again; calls that were queued behind it on the dead actor go back on the queue uncharged.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tuner import signals
from tuner.compiling import CompileAhead
from tuner.errors import RunFailed
from tuner.timeline import Timeline
from tuner.journal import Journal, WorkerEnv
from tuner.pool import Done, Lost, Raised, Slot, WorkerPool
from tuner.progress import Progress
from tuner.search import Strategy
from workers.records import Candidate, Config, Level, Measurement, MoEShape, Status

MAX_ATTEMPTS = 2
POLL_S = 0.5
SHORT_POLL_S = 0.05


@dataclass
class _Work:
    candidate: Candidate
    group: "DeviceGroup"
    attempts: int = 0
    avoid: set[int] = field(default_factory=set)
    causes: list[str] = field(default_factory=list)

    @property
    def affinity(self) -> tuple:
        return _affinity(self.candidate)


def _affinity(candidate: Candidate) -> tuple:
    """The problem a worker sets up for ``candidate``: (shape, routing, M); a worker that holds it
    takes the candidate without setting up again (``Slot.last_group``)."""
    return (candidate.shape, candidate.routing, candidate.M)


@dataclass
class DeviceGroup:
    """The actors of one worker environment, the strategy searching for it, and what it measured."""

    env: WorkerEnv
    slots: list[Slot]
    strategy: Strategy
    compiler: CompileAhead | None = None
    queue: list[_Work] = field(default_factory=list)
    compiling: list[_Work] = field(default_factory=list)
    known: set[Candidate] = field(default_factory=set)
    measurements: list[Measurement] = field(default_factory=list)
    speculated_at: tuple[int, int] | None = None
    """(measurements, compile outcomes) when the strategy was last asked for its likely next configs."""
    ran: set[tuple[MoEShape, Config]] = field(default_factory=set)
    """(shape, config) a worker of this group ran in this run's search: compiled on its node."""

    @property
    def device(self) -> str:
        return self.env.device


class Engine:
    """Runs the search phase of every device group over one pool of actors.

    ``budget_s`` is the time budget, counted from the first candidate handed to a GPU; ``clock``
    is injectable so the budget can be tested without waiting for it. ``workers_lost``: the run
    ended because no worker was left (``run`` returns; the caller decides what to write).
    """

    def __init__(self, pool: WorkerPool, groups: list[DeviceGroup], journal: Journal, progress: Progress,
                 budget_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 timeline: Timeline | None = None) -> None:
        self.pool = pool
        self.groups = groups
        self.journal = journal
        self.progress = progress
        self.budget_s = budget_s
        self.deadline: float | None = None
        self.clock = clock
        self.timeline = timeline or Timeline(clock)
        self.budget_ended = False
        self.workers_lost = False
        self.evaluations_run = 0
        self.evaluations_reused = 0
        self._observed = False
        self._group_of_slot = {slot.index: g for g in groups for slot in g.slots}

    def run(self) -> None:
        while True:
            signals.check()
            self.progress.tick()
            proposed = False
            # Outcomes that arrive after the strategy was last asked (a compile-ahead verdict settled
            # while the GPUs sat idle) may free a group's next round: the run ends only once the
            # strategy, asked after the last outcome, has nothing more to propose.
            self._observed = False
            if self._within_budget():
                for group in self.groups:
                    if not group.queue:
                        proposed |= self._refill(group)
            self._settle_compiled()
            self._dispatch()
            self._speculate()
            queued = any(g.queue for g in self.groups)
            compiling = [g.compiler for g in self.groups if g.compiling and g.compiler is not None]
            if not self.pool.busy() and not queued and not compiling:
                if proposed or (self._observed and not self.budget_ended):
                    continue  # the strategy has outcomes it was not asked about yet: it may want more
                return
            if not self.pool.live_slots():
                self.workers_lost = True
                return
            # While GPUs sit free and configs are still compiling, look at both often.
            wait_s = SHORT_POLL_S if compiling and self.pool.free_slots() else POLL_S
            # A lost actor has nothing in flight but is brought back only by polling: poll while
            # any is recovering, or a run whose every worker is restarting would spin forever.
            if self.pool.busy() or self.pool.recovering():
                for event in self.pool.poll(wait_s):
                    self._handle(event)
            elif compiling:
                compiling[0].pump(wait_s)

    def _within_budget(self) -> bool:
        """False once the budget has ended: then everything not yet on a GPU is dropped (what is in
        flight still finishes)."""
        if self.budget_ended or self.deadline is None or self.clock() < self.deadline:
            return not self.budget_ended
        self.budget_ended = True
        dropped = sum(len(g.queue) + len(g.compiling) for g in self.groups)
        for group in self.groups:
            group.queue.clear()
            group.compiling.clear()
        self.progress.dropped(dropped)
        self.progress.note(f"time budget of {self.budget_s / 60:g} min (counted from the first measurement) ended: "
                           f"{dropped} queued candidates dropped; what is in flight finishes")
        return False

    def _refill(self, group: DeviceGroup) -> bool:
        """Ask the strategy for more; answer what the journal knows. True if anything new was proposed."""
        proposals = group.strategy.propose()
        new = [c for c in dict.fromkeys(proposals) if c not in group.known]
        group.known.update(new)
        self.progress.queued(len(new))  # before answering from the journal: done never runs ahead of queued
        for candidate in new:
            known = self.journal.measurement(group.env, candidate)
            if known is not None:
                self._finish(group, known, reused=True)
            else:
                self._route(_Work(candidate, group))
        return bool(proposals)

    def _route(self, work: _Work) -> None:
        """Queue a candidate for the GPUs once its config is compiled; settle it here if compiling failed."""
        group = work.group
        if group.compiler is None:
            group.queue.append(work)
            return
        outcome = group.compiler.status(work.candidate.shape, work.candidate.config)
        if outcome is None:
            group.compiling.append(work)
        elif outcome.verdict:
            self._finish(group, self._failure(work, outcome.status, f"compile-ahead: {outcome.message}"),
                         reused=False)
        else:
            group.queue.append(work)

    def _settle_compiled(self) -> None:
        for group in self.groups:
            if group.compiler is None or not (group.compiling or group.compiler.outstanding):
                continue
            if group.compiler.pump(0) or group.compiling:
                self.timeline.touch("compile_ahead")
            waiting, group.compiling = group.compiling, []
            for work in waiting:
                self._route(work)

    def _dispatch(self) -> None:
        for slot in self.pool.free_slots():
            if not self._within_budget():
                return
            group = self._group_of_slot[slot.index]
            work = self._take(group.queue, group, slot)
            if work is None and not slot.pending and group.compiling:
                # Idle, and nothing compiled is ready: rather than wait for compile-ahead, the
                # worker compiles one itself (its outcome stands, whatever compile-ahead says later).
                work = self._take(group.compiling, group, slot)
                if work is not None and group.compiler is not None:
                    group.compiler.stats.taken_uncompiled += 1
            if work is not None:
                slot.last_group = work.affinity
                if self.deadline is None and self.budget_s is not None:
                    self.deadline = self.clock() + self.budget_s
                self.timeline.measuring()
                self.timeline.touch(_phase_of(work.candidate))
                self.pool.submit(slot, work, lambda actor, c=work.candidate: actor.measure.remote(c))

    def _speculate(self) -> None:
        """Fill compile processes no job waits for with the configs the strategy is likely to
        propose next (asked again only once a measurement or a compile outcome came in)."""
        for group in self.groups:
            compiler = group.compiler
            if compiler is None or not self._within_budget() or compiler.spare() <= 0:
                continue
            state = (len(group.measurements), compiler.stats.outcomes.total())
            if state == group.speculated_at:
                continue
            group.speculated_at = state
            compiler.speculate(dict.fromkeys((c.shape, c.config) for c in group.strategy.likely_next()))

    def _take(self, works: list[_Work], group: DeviceGroup, slot: Slot) -> _Work | None:
        """The next candidate of ``works`` (oldest first) for ``slot``: one of the (shape, routing,
        M) it holds a problem for; else one of a (shape, routing, M) no other live worker holds (so
        each problem is built once, not by every worker in turn: with every worker on the queue's
        head, each batch size's weights and fp32 reference were built on each GPU, a serial cost
        per M that no number of GPUs shortened); else the oldest."""
        others = [s for s in group.slots if not s.retired and s.index != slot.index]
        held = {s.last_group for s in others}
        unheld = fallback = None
        for i, work in enumerate(works):
            if slot.index in work.avoid and others:
                continue
            if work.affinity == slot.last_group:
                return works.pop(i)
            if fallback is None:
                fallback = i
            if unheld is None and work.affinity not in held:
                unheld = i
        chosen = unheld if unheld is not None else fallback
        return works.pop(chosen) if chosen is not None else None

    def _handle(self, event: Done | Lost | Raised) -> None:
        work: _Work = event.task
        if isinstance(event, Done):
            work.group.ran.add((work.candidate.shape, work.candidate.config))
            self._finish(work.group, event.value, reused=False, attempts=work.attempts + 1)
        elif isinstance(event, Raised):
            message = f"worker call failed: {event.reason}"
            self._finish(work.group, self._failure(work, Status.CRASHED, message), reused=False,
                         attempts=work.attempts + 1)
        elif not event.culprit:
            work.group.queue.insert(0, work)
        else:
            work.attempts += 1
            work.avoid.add(event.slot.index)
            work.causes.append(event.detail)
            if work.attempts >= MAX_ATTEMPTS:
                self._finish(work.group, self._failure(work, event.cause, "; ".join(work.causes)), reused=False,
                             attempts=work.attempts)
            else:
                work.group.queue.insert(0, work)

    def _failure(self, work: _Work, status: Status, message: str) -> Measurement:
        return Measurement(candidate=work.candidate, status=status, device=work.group.device,
                           versions={"torch": work.group.env.get("torch"), "triton": work.group.env.get("triton")},
                           message=message)

    def _finish(self, group: DeviceGroup, measurement: Measurement, reused: bool, attempts: int = 1) -> None:
        if reused:
            self.evaluations_reused += 1
        else:
            self.timeline.touch(_phase_of(measurement.candidate))
            self.journal.record_measurement(group.env, measurement, attempts)
            self.evaluations_run += 1
        group.measurements.append(measurement)
        group.strategy.observe(measurement)
        self._observed = True
        self.progress.record(measurement, reused=reused)


def _phase_of(candidate: Candidate) -> str:
    return "screening" if candidate.level is Level.SCREEN else "full_timing"


class Retimer:
    """Re-times groups of finalists on the actors of one device group, journaling each result.

    ``deadline`` (a ``clock()`` instant; None: no bound) caps the re-timing: no group is handed
    to a worker after it; the calls running then finish (each bounded by the per-call timeout),
    and the groups never started keep the search's numbers (counted in ``cut``). ``clock`` is
    injectable, as the engine's.

    Compile-ahead (the group's ``compiler``, its search ended: ``CompileAhead.end_search``): the
    finalists' configs that no worker of the group ran in this run's search (``DeviceGroup.ran``)
    and compile-ahead has not compiled — finalists reused from the journal: a resumed run, another
    node, an empty Triton cache — are submitted as needed jobs before anything is re-timed. A batch
    size is handed to a worker once all its finalists are compiled; a worker with nothing compiled
    to take takes the oldest batch size still compiling (preferring the one whose problem it
    holds) and compiles for itself, as in the search. Once no batch size left waits for a compile,
    the services are released (``CompileAhead.release``); with nothing to compile, at once."""

    def __init__(self, pool: WorkerPool, group: DeviceGroup, journal: Journal, progress: Progress,
                 timeline: Timeline | None = None, deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.timeline = timeline or Timeline()
        self.group = group
        self.journal = journal
        self.progress = progress
        self.deadline = deadline
        self.clock = clock
        self.fresh = 0
        self.reused = 0
        self.cut = 0

    def __call__(self, finalist_groups: list[list[Candidate]]) -> list[list[float] | None]:
        results: list[list[float] | None] = [None] * len(finalist_groups)
        todo: list[tuple[int, list[Candidate]]] = []
        for i, candidates in enumerate(finalist_groups):
            results[i] = self.journal.retime(self.group.env, candidates)
            if results[i] is not None:
                self.reused += 1
            else:
                todo.append((i, candidates))
        compiling = self._compile_ahead(todo)
        if todo:
            jobs = len(set().union(*compiling.values()))
            self.progress.phase(f"re-timing the finalists of {len(todo)} batch sizes on {self.group.device}"
                                + (f" ({jobs} configs compiling ahead)" if jobs else ""))
            self.timeline.touch("retiming")
        slots = {s.index for s in self.group.slots}
        while todo or any(s.pending for s in self.group.slots):
            signals.check()
            if todo and self.deadline is not None and self.clock() >= self.deadline:
                self.cut += len(todo)
                self.progress.note(f"re-timing cap reached: {len(todo)} batch sizes on {self.group.device} keep "
                                   "the search's numbers")
                todo = []
            self._settle(compiling, todo)
            for slot in self.pool.free_slots():
                if slot.index in slots and todo and not slot.pending:
                    item = todo.pop(self._pick(todo, slot, compiling))
                    self._count_handed(compiling, item[0])
                    slot.last_group = _affinity(item[1][0])
                    self.pool.submit(slot, item, lambda actor, cs=item[1]: actor.retime.remote(cs))
            if not any(not s.retired for s in self.group.slots):
                break
            self.progress.tick()
            for event in self.pool.poll(POLL_S):
                index, candidates = event.task
                if isinstance(event, Done):
                    results[index] = list(event.value)
                    self.fresh += 1
                    self.journal.record_retime(self.group.env, candidates, results[index])
                else:
                    self.progress.note(f"re-timing at M={candidates[0].M} failed ({event.reason}); "
                                       "choosing on the search's numbers")
        self._settle(compiling, todo)
        if "retiming" in self.timeline.spans:
            self.timeline.touch("retiming")
        return results

    def _compile_ahead(self, todo: list[tuple[int, list[Candidate]]]) -> dict[int, set[tuple[MoEShape, Config]]]:
        """Ask compile-ahead for the configs of ``todo`` not compiled in this run: per batch size
        (its index) the configs still compiling; empty where nothing is."""
        compiler = self.group.compiler
        if compiler is None:
            return {}
        waiting: dict[int, set[tuple[MoEShape, Config]]] = {}
        asked: set[tuple[MoEShape, Config]] = set()
        for index, candidates in todo:
            keys = {(c.shape, c.config) for c in candidates} - self.group.ran
            pending = {key for key in keys if compiler.status(*key) is None}
            asked |= pending
            if pending:
                waiting[index] = pending
        compiler.stats.retiming_jobs += len(asked)
        return waiting

    def _settle(self, compiling: dict[int, set[tuple[MoEShape, Config]]],
                todo: list[tuple[int, list[Candidate]]]) -> None:
        """Take in compile-ahead's outcomes; release its services once no batch size left waits."""
        compiler = self.group.compiler
        if compiler is None:
            return
        waiting = [index for index, _ in todo if compiling.get(index)]
        if waiting:
            if compiler.pump(0):
                self.timeline.touch("compile_ahead")
            for index in waiting:
                compiling[index] = {key for key in compiling[index] if compiler.status(*key) is None}
        if not any(compiling.get(index) for index, _ in todo):
            compiler.release()

    def _pick(self, todo: list[tuple[int, list[Candidate]]], slot: Slot,
              compiling: dict[int, set[tuple[MoEShape, Config]]]) -> int:
        """Which of ``todo`` ``slot`` re-times next: a batch size all compiled, the one whose
        problem it holds first; with none compiled, its own, else the oldest."""
        def mine(i: int) -> bool:
            return _affinity(todo[i][1][0]) == slot.last_group

        ready = [i for i, (index, _) in enumerate(todo) if not compiling.get(index)]
        candidates = ready or list(range(len(todo)))
        return next((i for i in candidates if mine(i)), candidates[0])

    def _count_handed(self, compiling: dict[int, set[tuple[MoEShape, Config]]], index: int) -> None:
        """Count batch size ``index`` handed to a worker, if the re-timing asked compile-ahead for
        it (``compiling`` is empty without compile-ahead): compiled by then, or still compiling."""
        if index not in compiling:
            return
        stats = self.group.compiler.stats
        if compiling.pop(index):
            stats.retiming_taken_uncompiled += 1
        else:
            stats.retiming_compiled += 1


def device_groups(pool: WorkerPool, strategy_for: Callable[[str], Strategy]) -> list[DeviceGroup]:
    """The pool's actors grouped by worker environment, each group with ``strategy_for(device name)``.
    Raises RunFailed when two groups share a device name (their results would share one file)."""
    by_env: dict[WorkerEnv, list[Slot]] = {}
    for slot in pool.slots:
        by_env.setdefault(WorkerEnv.of(slot.env), []).append(slot)
    names = Counter(env.device for env in by_env)
    clash = [name for name, n in names.items() if n > 1]
    if clash:
        raise RunFailed(f"workers on {clash[0]} differ in torch/Triton/kernel versions; "
                        "their results cannot share one config file")
    return [DeviceGroup(env=env, slots=slots, strategy=strategy_for(env.device)) for env, slots in by_env.items()]


def no_retiming(finalist_groups: list[list[Candidate]]) -> list[list[float] | None]:
    """When every worker is lost: choose on the search's own numbers."""
    return [None] * len(finalist_groups)


