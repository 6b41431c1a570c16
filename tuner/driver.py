"""The tuning engine: Ray actors measure what the strategy proposes; the journal remembers everything.

One run: start (or join) Ray, create one BenchmarkWorker actor per GPU, group the actors by what
they are (device name, versions, kernel hash — results of different GPU types are never mixed),
then per group: the strategy proposes candidates; those already in the journal are answered from
it; the rest go on one shared queue, from which every idle actor takes the next candidate,
preferring one of the (shape, routing, M) it holds a problem for (so setup is done once per group,
and no GPU idles while work remains). Results are journaled as they arrive. At the end the
finalists of every (shape, M) are re-timed on one actor (``tuner.select``), the winners written
through ``tuner.writers``.

Retries are the engine's, not Ray's: a candidate whose actor died (crash, poisoned CUDA context,
hang) is retried once on another actor and quarantined (``crashed`` / ``timeout``) if it fails
again; calls that were queued behind it on the dead actor go back on the queue uncharged.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray

from tuner import select as selection
from tuner.errors import RunFailed
from tuner.journal import (Journal, measurement_key, measurement_to_record, record_to_measurement, retime_key,
                           retime_to_record)
from tuner.pool import Done, Lost, Raised, Slot, WorkerPool, WorkerStartFailed
from tuner.progress import Progress
from tuner.search import STRATEGIES, SearchJob, Strategy
from tuner.writers import write_sglang, write_vllm
from workers import faults
from workers.records import Candidate, Gemm, Measurement, Status

MAX_ATTEMPTS = 2
POLL_S = 0.5
INTERPRET_NUM_GPUS = 2


OutputWriter = Callable[[str, dict[str, str], dict[selection.GroupKey, selection.Selection]], list[Path]]
"""Writes the winners of one device group (device name, worker environment, selections); returns the paths."""


FORMATS = ("vllm", "sglang", "both")


def server_files_writer(out: Path, formats: str) -> OutputWriter:
    """Writes a device group's winners in vLLM's and/or SGLang's layout under ``out``: one config
    per M for both GEMMs (vLLM applies one config to both; split up/down files are the fast
    search's, tuner.search)."""
    if formats not in FORMATS:
        raise ValueError(f"unknown format {formats!r}; expected one of {FORMATS}")

    def write(device: str, env: dict[str, str], chosen: dict[selection.GroupKey, selection.Selection]) -> list[Path]:
        paths: list[Path] = []
        for (shape, _routing, gemm), per_m in selection.by_shape(chosen).items():
            if gemm is not Gemm.BOTH:
                continue
            configs = {M: s.candidate.config for M, s in per_m.items()}
            if formats in ("vllm", "both"):
                paths.append(write_vllm(out, shape, device, configs, env["triton"]))
            if formats in ("sglang", "both"):
                paths += write_sglang(out, shape, device, configs, None, env["triton"])
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
    address: str | None = None
    workers: int | None = None
    interpret: bool = False
    kernel: str = "builtin"
    timeout_s: float = 300.0
    finalists: int = selection.FINALISTS
    strategy: str = "exhaustive"


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


@dataclass
class TuneResult:
    """The run's outcome. ``failed`` counts every candidate of the search that did not pass,
    measured now or reused from the journal (the search's result, not this process's work)."""

    evaluations_run: int = 0
    evaluations_reused: int = 0
    retimed_groups: int = 0
    retimes_reused: int = 0
    wall_s: float = 0.0
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
    queue: list[_Work] = field(default_factory=list)
    known: set[str] = field(default_factory=set)
    measurements: list[Measurement] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.env["device"]


def _env_key(env: dict[str, str]) -> tuple:
    return tuple(sorted(env.items()))


class Engine:
    """Runs the search phase of every device group over one pool of actors."""

    def __init__(self, pool: WorkerPool, groups: list[_DeviceGroup], journal: Journal, progress: Progress) -> None:
        self.pool = pool
        self.groups = groups
        self.journal = journal
        self.progress = progress
        self.evaluations_run = 0
        self.evaluations_reused = 0
        self._group_of_slot = {slot.index: g for g in groups for slot in g.slots}

    def run(self) -> None:
        while True:
            proposed = False
            for group in self.groups:
                if not group.queue:
                    proposed |= self._refill(group)
            self._dispatch()
            queued = any(g.queue for g in self.groups)
            if not self.pool.busy() and not queued:
                if proposed:
                    continue  # everything proposed was in the journal; the strategy may want more
                return
            if not self.pool.live_slots():
                raise RunFailed("every worker was lost; the journal keeps what was measured, run again to resume")
            for event in self.pool.poll(POLL_S):
                self._handle(event)

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
                group.queue.append(_Work(candidate, key, group))
        self.progress.set_total(max(hint, self.progress.done + sum(len(g.queue) for g in self.groups)))
        return bool(proposals)

    def _dispatch(self) -> None:
        for slot in self.pool.free_slots():
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


def _start_ray(request: TuneRequest) -> None:
    """Start an embedded Ray, or join the cluster named by --address (or RAY_ADDRESS, as under
    ``ray job submit``)."""
    env_vars = {}
    if request.interpret:
        env_vars["TRITON_INTERPRET"] = "1"
    if os.environ.get(faults.ENV_VAR):
        env_vars[faults.ENV_VAR] = os.environ[faults.ENV_VAR]
    runtime_env = {"env_vars": env_vars} if env_vars else None
    address = request.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    if request.interpret:
        gpus = request.workers or INTERPRET_NUM_GPUS
        ray.init(num_cpus=max(2, gpus), num_gpus=gpus, include_dashboard=False, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env)


def _create_pool(request: TuneRequest, progress: Progress) -> WorkerPool:
    from workers.worker import BenchmarkWorker

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise RunFailed("Ray reports no GPUs (on a machine without one, use --interpret)")
    count = min(gpus, request.workers) if request.workers else gpus
    actor_class = ray.remote(BenchmarkWorker).options(num_gpus=1, max_restarts=-1, max_task_retries=0)
    actors = [actor_class.remote(kernel=request.kernel, timeout_s=request.timeout_s) for _ in range(count)]
    pool = WorkerPool(actors, request.timeout_s, progress.note)
    try:
        pool.describe_all()
    except WorkerStartFailed as exc:
        pool.shutdown()
        raise RunFailed(str(exc)) from None
    return pool


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
    return [_DeviceGroup(env=slots[0].env, slots=slots, strategy=strategy_class(request.jobs_for_device(slots[0].device)))
            for slots in by_env.values()]


def _choose_and_write(group: _DeviceGroup, retimer: Retimer, request: TuneRequest, progress: Progress) -> DeviceResult:
    chosen = selection.select(group.measurements, retimer, request.finalists)
    missing = selection.groups_without_winner(group.measurements)
    if missing:
        progress.note(f"no correct config on {group.device} at " + ", ".join(f"M={k.M}" for k in missing[:8])
                      + (" …" if len(missing) > 8 else ""))
    files = request.write_outputs(group.device, group.env, chosen) if chosen else []
    return DeviceResult(group.device, group.env, len(group.slots), group.measurements, chosen, missing, files)


def tune(request: TuneRequest, progress: Progress | None = None) -> TuneResult:
    """Run the whole tune: search, re-time finalists, write files. Raises RunFailed on run failures."""
    progress = progress or Progress()
    started = time.monotonic()
    result = TuneResult()
    # Ray prints what it forwards from the cluster (worker output, "(raylet) A worker died …")
    # on the driver's stdout; stdout belongs to the command's result (``--json``), so all of that
    # goes to stderr while Ray runs.
    with Journal(request.journal_path, fresh=request.fresh) as journal, contextlib.redirect_stdout(sys.stderr):
        if journal.set_aside is not None:
            progress.note(f"--fresh: previous journal kept as {journal.set_aside}")
        _start_ray(request)
        pool = None
        try:
            pool = _create_pool(request, progress)
            groups = _device_groups(pool, request)
            for g in groups:
                progress.note(f"{len(g.slots)} worker(s) on {g.device} (torch {g.env['torch']}, "
                              f"triton {g.env['triton']}, kernel {g.env['kernel']})")
            engine = Engine(pool, groups, journal, progress)
            engine.run()
            progress.close()
            result.evaluations_run, result.evaluations_reused = engine.evaluations_run, engine.evaluations_reused
            for group in groups:
                retimer = Retimer(pool, group, journal, progress)
                result.devices.append(_choose_and_write(group, retimer, request, progress))
                result.retimed_groups += retimer.fresh
                result.retimes_reused += retimer.reused
        finally:
            if pool is not None:
                pool.shutdown()
            ray.shutdown()
    result.wall_s = time.monotonic() - started
    return result
