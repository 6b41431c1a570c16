"""The tuning engine: Ray actors measure what the strategy proposes; the journal remembers everything.

One run, inside the command's ``tuner.ray_session``: create one BenchmarkWorker actor per GPU
(``tuner.pool.start_pool``), group the actors by what
they are (device name, versions, kernel hash — results of different GPU types are never mixed),
then per group: the strategy proposes candidates; those already in the journal are answered from
it; the rest go on one shared queue, from which every idle actor takes the next candidate,
preferring one of the (shape, routing, M) it holds a problem for (so setup is done once per group,
and no GPU idles while work remains). Results are journaled as they arrive. At the end the
finalists of every (shape, M) are re-timed on one actor (``tuner.select``), the winners written
through ``tuner.writers``.

Compile-ahead (``tuner.compiling``): on a GPU, a candidate whose config is not compiled yet waits
off the queue while CPU processes on its node compile it; compile errors, out-of-resources and
compile time-outs found there are recorded as the candidate's outcome and never reach a GPU.
A time budget (``budget_s``) stops the search where it is: nothing more is proposed or queued,
calls in flight finish, and the best so far is chosen (without re-timing) and written.

Retries are the engine's, not Ray's: a candidate whose actor died (crash, poisoned CUDA context,
hang) is retried once on another actor and quarantined (``crashed`` / ``timeout``) if it fails
again; calls that were queued behind it on the dead actor go back on the queue uncharged.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from tuner import select as selection
from tuner.compiling import DEFAULT_COMPILE_TIMEOUT_S, CompileAhead, CompileStats
from tuner.errors import RunFailed
from tuner.journal import (Journal, measurement_key, measurement_to_record, record_to_measurement, retime_key,
                           retime_to_record)
from tuner.pool import STARTUP_TIMEOUT_S, Done, Lost, Raised, Slot, WorkerPool, start_pool
from tuner.progress import Progress
from tuner.search import STRATEGIES, SearchJob, Strategy
from tuner.writers import write_sglang, write_vllm
from workers.compile_ahead import CompileTarget
from workers.records import Candidate, Gemm, Measurement, MoEShape, Status

MAX_ATTEMPTS = 2
POLL_S = 0.5
SHORT_POLL_S = 0.05


SplitChoices = dict[tuple[MoEShape, str], dict[int, selection.SplitChoice]]
OutputWriter = Callable[[str, dict[str, str], dict[selection.GroupKey, selection.Selection], SplitChoices], list[Path]]
"""Writes the winners of one device group (device name, worker environment, whole-op selections,
split up/down choices); returns the paths."""


FORMATS = ("vllm", "sglang", "both")


def server_files_writer(out: Path, formats: str) -> OutputWriter:
    """Writes a device group's winners in vLLM's and/or SGLang's layout under ``out``. vLLM applies
    one config to both GEMMs: its file holds the whole-op winner per M. SGLang's file holds the
    up GEMM's config and its ``_down`` file the down GEMM's where the split search chose a pair
    (batch sizes without a pair keep the whole-op winner for both)."""
    if formats not in FORMATS:
        raise ValueError(f"unknown format {formats!r}; expected one of {FORMATS}")

    def write(device: str, env: dict[str, str], chosen: dict[selection.GroupKey, selection.Selection],
              split: SplitChoices) -> list[Path]:
        paths: list[Path] = []
        for (shape, routing, gemm), per_m in selection.by_shape(chosen).items():
            if gemm is not Gemm.BOTH:
                continue
            configs = {M: s.candidate.config for M, s in per_m.items()}
            if formats in ("vllm", "both"):
                paths.append(write_vllm(out, shape, device, configs, env["triton"]))
            if formats in ("sglang", "both"):
                pairs = split.get((shape, routing), {})
                up = {M: pairs[M].up if M in pairs else c for M, c in configs.items()}
                down = {M: pairs[M].down if M in pairs else c for M, c in configs.items()} if pairs else None
                paths += write_sglang(out, shape, device, up, down, env["triton"])
        return paths
    return write


@dataclass(frozen=True)
class TuneRequest:
    """Everything one run needs, validated already (``tuner.commands.tune`` builds it)."""

    jobs_for_device: Callable[[str], list[SearchJob]]
    """The pruned search for one device name (pruning depends on the GPU's limits)."""
    write_outputs: OutputWriter
    journal_path: Path
    fresh: bool = False
    workers: int | None = None
    interpret: bool = False
    kernel: str = "builtin"
    timeout_s: float = 300.0
    finalists: int = selection.FINALISTS
    strategy: str = "fast"
    split_gemms: bool = False
    budget_s: float | None = None
    compile_ahead: bool = True
    compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S


@dataclass
class DeviceResult:
    """What one GPU type produced: every measurement (fresh and reused), the winners, the files."""

    device: str
    env: dict[str, str]
    workers: int
    measurements: list[Measurement] = field(default_factory=list)
    selections: dict[selection.GroupKey, selection.Selection] = field(default_factory=dict)
    without_winner: list[selection.GroupKey] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    split: SplitChoices = field(default_factory=dict)
    compile: CompileStats | None = None


@dataclass
class TuneResult:
    """The run's outcome. ``failed`` counts every candidate of the search that did not pass,
    measured now or reused from the journal (the search's result, not this process's work)."""

    evaluations_run: int = 0
    evaluations_reused: int = 0
    retimed_groups: int = 0
    retimes_reused: int = 0
    wall_s: float = 0.0
    budget_ended: bool = False
    devices: list[DeviceResult] = field(default_factory=list)

    @property
    def failed(self) -> Counter[str]:
        return Counter(m.status.value for d in self.devices for m in d.measurements if not m.ok)

    @property
    def files_written(self) -> list[Path]:
        return [p for d in self.devices for p in d.files]


@dataclass
class _Work:
    candidate: Candidate
    key: str
    group: "_DeviceGroup"
    attempts: int = 0
    avoid: set[int] = field(default_factory=set)
    causes: list[str] = field(default_factory=list)

    @property
    def affinity(self) -> tuple:
        c = self.candidate
        return (c.shape, c.routing, c.M)


@dataclass
class _DeviceGroup:
    env: dict[str, str]
    slots: list[Slot]
    strategy: Strategy
    compiler: CompileAhead | None = None
    queue: list[_Work] = field(default_factory=list)
    compiling: list[_Work] = field(default_factory=list)
    known: set[str] = field(default_factory=set)
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.env["device"]


def _env_key(env: dict[str, str]) -> tuple:
    return tuple(sorted(env.items()))


class Engine:
    """Runs the search phase of every device group over one pool of actors.

    ``deadline`` (a ``clock()`` value) is the time budget's end; ``clock`` is injectable so the
    budget can be tested without waiting for it.
    """

    def __init__(self, pool: WorkerPool, groups: list[_DeviceGroup], journal: Journal, progress: Progress,
                 deadline: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.groups = groups
        self.journal = journal
        self.progress = progress
        self.deadline = deadline
        self.clock = clock
        self.budget_ended = False
        self.evaluations_run = 0
        self.evaluations_reused = 0
        self._group_of_slot = {slot.index: g for g in groups for slot in g.slots}

    def run(self) -> None:
        while True:
            proposed = False
            if self._within_budget():
                for group in self.groups:
                    if not group.queue:
                        proposed |= self._refill(group)
            self._settle_compiled()
            self._dispatch()
            queued = any(g.queue for g in self.groups)
            compiling = [g.compiler for g in self.groups if g.compiling and g.compiler is not None]
            if not self.pool.busy() and not queued and not compiling:
                if proposed:
                    continue  # everything proposed was in the journal; the strategy may want more
                return
            if not self.pool.live_slots():
                raise RunFailed("every worker was lost; the journal keeps what was measured, run again to resume")
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
        self.progress.note(f"time budget ended: {dropped} queued candidates dropped; keeping the best so far")
        return False

    def _refill(self, group: _DeviceGroup) -> bool:
        """Ask the strategy for more; answer what the journal knows. True if anything new was proposed."""
        proposals = group.strategy.propose()
        hint = sum(g.strategy.total_hint() or 0 for g in self.groups)
        for candidate in proposals:
            key = measurement_key(group.env, candidate)
            if key in group.known:
                continue
            group.known.add(key)
            record = self.journal.get(key)
            if record is not None and record.get("kind") == "measure":
                self._finish(group, record_to_measurement(record), reused=True)
            else:
                self._route(_Work(candidate, key, group))
        waiting = sum(len(g.queue) + len(g.compiling) for g in self.groups)
        self.progress.set_total(max(hint, self.progress.done + waiting))
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
            if group.compiler is not None and group.compiling:
                group.compiler.pump(0)
                waiting, group.compiling = group.compiling, []
                for work in waiting:
                    self._route(work)

    def _dispatch(self) -> None:
        for slot in self.pool.free_slots():
            if not self._within_budget():
                return
            group = self._group_of_slot[slot.index]
            work = self._take(group, slot)
            if work is not None:
                slot.last_group = work.affinity
                self.pool.submit(slot, work, lambda actor, c=work.candidate: actor.measure.remote(c))

    def _take(self, group: _DeviceGroup, slot: Slot) -> _Work | None:
        others_alive = any(not s.retired and s.index != slot.index for s in group.slots)
        fallback = None
        for i, work in enumerate(group.queue):
            if slot.index in work.avoid and others_alive:
                continue
            if work.affinity == slot.last_group:
                return group.queue.pop(i)
            if fallback is None:
                fallback = i
        return group.queue.pop(fallback) if fallback is not None else None

    def _handle(self, event: Done | Lost | Raised) -> None:
        work: _Work = event.task
        if isinstance(event, Done):
            self._finish(work.group, event.value, reused=False, attempts=work.attempts + 1)
        elif isinstance(event, Raised):
            message = f"worker call failed: {type(event.error).__name__}: {event.error}".splitlines()[0][:500]
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
                           versions={"torch": work.group.env.get("torch", ""), "triton": work.group.env.get("triton", "")},
                           message=message)

    def _finish(self, group: _DeviceGroup, measurement: Measurement, reused: bool, attempts: int = 1) -> None:
        if reused:
            self.evaluations_reused += 1
        else:
            self.journal.append(measurement_to_record(measurement_key(group.env, measurement.candidate),
                                                      measurement, attempts))
            self.evaluations_run += 1
        group.measurements.append(measurement)
        group.strategy.observe(measurement)
        self.progress.record(measurement, reused=reused)


class Retimer:
    """Re-times groups of finalists on the actors of one device group, journaling each result."""

    def __init__(self, pool: WorkerPool, group: _DeviceGroup, journal: Journal, progress: Progress) -> None:
        self.pool = pool
        self.group = group
        self.journal = journal
        self.progress = progress
        self.fresh = 0
        self.reused = 0

    def __call__(self, finalist_groups: list[list[Candidate]]) -> list[list[float] | None]:
        results: list[list[float] | None] = [None] * len(finalist_groups)
        todo: list[tuple[int, str, list[Candidate]]] = []
        for i, candidates in enumerate(finalist_groups):
            key = retime_key(measurement_key(self.group.env, c) for c in candidates)
            record = self.journal.get(key)
            if record is not None and record.get("kind") == "retime":
                results[i] = list(record["latency_us"])
                self.reused += 1
            else:
                todo.append((i, key, candidates))
        if todo:
            self.progress.note(f"re-timing the finalists of {len(todo)} batch sizes on {self.group.device}")
        slots = {s.index for s in self.group.slots}
        while todo or any(s.pending for s in self.group.slots):
            for slot in self.pool.free_slots():
                if slot.index in slots and todo and not slot.pending:
                    item = todo.pop(0)
                    self.pool.submit(slot, item, lambda actor, cs=item[2]: actor.retime.remote(cs))
            if not any(not s.retired for s in self.group.slots):
                break
            for event in self.pool.poll(POLL_S):
                index, key, candidates = event.task
                if isinstance(event, Done):
                    results[index] = list(event.value)
                    self.fresh += 1
                    self.journal.append(retime_to_record(
                        key, [measurement_key(self.group.env, c) for c in candidates], results[index]))
                else:
                    reason = event.error if isinstance(event, Raised) else event.detail
                    self.progress.note(f"re-timing at M={candidates[0].M} failed ({reason}); "
                                       "choosing on the search's numbers")
        return results


def _device_groups(pool: WorkerPool, request: TuneRequest) -> list[_DeviceGroup]:
    by_env: dict[tuple, list[Slot]] = {}
    for slot in pool.slots:
        by_env.setdefault(_env_key(slot.env), []).append(slot)
    names = Counter(slots[0].device for slots in by_env.values())
    clash = [name for name, n in names.items() if n > 1]
    if clash:
        raise RunFailed(f"workers on {clash[0]} differ in torch/Triton/kernel versions; "
                        "their results cannot share one config file")
    strategy_class = STRATEGIES[request.strategy]
    return [_DeviceGroup(env=slots[0].env, slots=slots,
                         strategy=strategy_class(request.jobs_for_device(slots[0].device), request.split_gemms))
            for slots in by_env.values()]


def _compile_ahead(group: _DeviceGroup, request: TuneRequest, progress: Progress) -> CompileAhead | None:
    """A compile-ahead service on each node of the group's workers, sized to the node's CPUs
    minus one per GPU worker there; None where nothing compiles ahead (interpreter, a server's
    kernel, ``compile_ahead`` off)."""
    if request.interpret or request.kernel != "builtin" or not request.compile_ahead:
        return None
    try:
        reports = ray.get([slot.actor.compile_target.remote() for slot in group.slots], timeout=STARTUP_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - compile-ahead is an optimisation; the workers can compile themselves
        progress.note(f"compile-ahead skipped on {group.device}: {type(exc).__name__}: {exc}".splitlines()[0][:300])
        return None
    if any(r is None for r in reports):
        return None
    first = reports[0]
    target = CompileTarget(first["backend"], first["arch"], first["warp_size"], first["max_shared_mem"])
    cpus = {node["NodeID"]: int(node.get("Resources", {}).get("CPU", 1)) for node in ray.nodes() if node.get("Alive")}
    workers_on = Counter(r["node_id"] for r in reports)
    processes = {node: max(1, cpus.get(node, 1) - count) for node, count in workers_on.items()}
    batch_sizes: dict[MoEShape, set[int]] = {}
    for job in group.strategy.jobs:
        batch_sizes.setdefault(job.shape, set()).update(job.batch_sizes)
    compiler = CompileAhead(target, processes, {shape: tuple(sorted(ms)) for shape, ms in batch_sizes.items()},
                            request.compile_timeout_s, progress.note)
    if not compiler.available:
        return None
    progress.note(f"compile-ahead: {compiler.stats.processes} CPU processes for {group.device} "
                  f"({target.backend} arch {target.arch})")
    return compiler


def _no_retiming(finalist_groups: list[list[Candidate]]) -> list[list[float] | None]:
    """After the time budget: choose on the search's own numbers."""
    return [None] * len(finalist_groups)


def _choose_and_write(group: _DeviceGroup, retimer: selection.Retimer, request: TuneRequest,
                      progress: Progress) -> DeviceResult:
    whole = [m for m in group.measurements if m.candidate.gemm is Gemm.BOTH]
    pinned = {selection.GroupKey(job.shape.label, job.routing, Gemm.BOTH.value, M): configs
              for job in group.strategy.jobs for M, configs in job.baseline_by_m.items()}
    chosen = selection.select(whole, retimer, request.finalists, pinned)
    split = selection.split_choices(group.measurements, chosen) if request.split_gemms else {}
    missing = selection.groups_without_winner(whole)
    if missing:
        progress.note(f"no correct config on {group.device} at " + ", ".join(f"M={k.M}" for k in missing[:8])
                      + (" …" if len(missing) > 8 else ""))
    files = request.write_outputs(group.device, group.env, chosen, split) if chosen else []
    return DeviceResult(group.device, group.env, len(group.slots), group.measurements, chosen, missing, files, split,
                        group.compiler.stats if group.compiler is not None else None)


def tune(request: TuneRequest, progress: Progress | None = None) -> TuneResult:
    """Run the whole tune: search, re-time finalists, write files. Needs an open
    ``tuner.ray_session``; raises RunFailed on run failures."""
    progress = progress or Progress()
    started = time.monotonic()
    result = TuneResult()
    with Journal(request.journal_path, fresh=request.fresh) as journal:
        if journal.set_aside is not None:
            progress.note(f"--fresh: previous journal kept as {journal.set_aside}")
        pool = None
        groups: list[_DeviceGroup] = []
        try:
            pool = start_pool(request.workers, request.kernel, request.timeout_s, progress.note)
            groups = _device_groups(pool, request)
            for g in groups:
                progress.note(f"{len(g.slots)} worker(s) on {g.device} (torch {g.env['torch']}, "
                              f"triton {g.env['triton']}, kernel {g.env['kernel']})")
                g.compiler = _compile_ahead(g, request, progress)
            deadline = started + request.budget_s if request.budget_s is not None else None
            engine = Engine(pool, groups, journal, progress, deadline)
            engine.run()
            progress.close()
            result.evaluations_run, result.evaluations_reused = engine.evaluations_run, engine.evaluations_reused
            result.budget_ended = engine.budget_ended
            for group in groups:
                if group.compiler is not None:
                    group.compiler.close()
                retimer = Retimer(pool, group, journal, progress)
                result.devices.append(_choose_and_write(group, _no_retiming if engine.budget_ended else retimer,
                                                        request, progress))
                result.retimed_groups += retimer.fresh
                result.retimes_reused += retimer.reused
        finally:
            for group in groups:
                if group.compiler is not None:
                    group.compiler.close()
            if pool is not None:
                pool.shutdown()
    result.wall_s = time.monotonic() - started
    return result
