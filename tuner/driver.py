"""One tune: the request, the result, and ``tune()`` (search, re-time finalists, write files).

Inside the command's ``tuner.ray_session``: one BenchmarkWorker actor per GPU
(``tuner.pool.start_pool``), grouped by worker environment, searched by ``tuner.engine`` (with
compile-ahead from ``tuner.compiling`` on GPUs), every result journaled (``tuner.journal``). Then
per device group the finalists of every (shape, M) are re-timed back to back (``tuner.select``;
finalists this run has not compiled are compiled ahead first: ``tuner.engine.Retimer``) and the
winners written through the request's ``tuner.writers.OutputWriter``. A time budget
(``budget_s``), counted from the first candidate handed to a GPU (worker start-up is not charged
to it), stops the search where it is; the finalists found by then (candidates with a correct full
timing, or a correct screen where a batch size got no full timing) are still re-timed, within a
cap of ``retime_cap_s(budget_s)`` seconds: no group starts after it, the calls running then
finish (each within the per-call timeout), and groups not reached keep the search's numbers.

Existing output files that writing would refuse are refused before any measurement
(``FileConflict`` → exit 2): here, once the workers have reported their device (a file's name
holds it); where it is known before Ray starts the command refused them already
(``tuner.commands.tune.known_device_name``). The journal's lock is taken here, the real guard
against a second live run (the command tried it before Ray started: ``check_not_busy``). When
every worker is lost, the batch sizes whose search had finished are still chosen (without
re-timing) and written, and the run then fails (exit 1) saying how many measurements the journal
holds for the resume. A failure to write says how to recover. On SIGTERM (``tuner.signals``) the
actors are killed and the resume hint names the journal (``Journal.resume_hint``: nothing
measured and the journal not started, when it was not). The summary's ``timeline``
(``tuner.timeline``) measures each phase.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuner import select as selection
from tuner import signals
from tuner.compiling import (DEFAULT_COMPILE_TIMEOUT_S, CompileAhead, CompileStats, PrestartedServices,
                             start_compile_ahead)
from tuner.engine import DeviceGroup, Engine, Retimer, device_groups, no_retiming
from tuner.errors import RunFailed, UsageError
from tuner.journal import Journal
from tuner.pool import start_pool
from tuner.progress import Progress
from tuner.search import STRATEGIES, SearchJob
from tuner.spaces import DeviceLimits
from tuner.timeline import Timeline
from tuner.writers import FileConflict, OutputWriter, SplitChoices, Written
from workers import faults
from workers.backends import BUILTIN
from workers.compile_ahead import Compiler
from workers.records import Gemm, Measurement, MoEShape

BUDGET_RETIME_MIN_S = 30.0
BUDGET_RETIME_FRACTION = 0.25


def retime_cap_s(budget_s: float) -> float:
    """Seconds the finalists may be re-timed for after the time budget ended: a quarter of the
    budget, at least ``BUDGET_RETIME_MIN_S`` (a full re-timing took 7–20 s per model on an H200)."""
    return max(BUDGET_RETIME_MIN_S, BUDGET_RETIME_FRACTION * budget_s)

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
    kernel: str = BUILTIN
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
    files: list[Written] = field(default_factory=list)
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
    retimes_cut: int = 0
    """Batch sizes whose finalists kept the search's numbers: the re-timing cap after the budget ran out."""
    retime_cap_s: float | None = None
    """The re-timing cap applied (seconds; only when the time budget ended the search)."""
    wall_s: float = 0.0
    budget_ended: bool = False
    budget_s: float | None = None
    devices: list[DeviceResult] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def failed(self) -> Counter[str]:
        return Counter(m.status.value for d in self.devices for m in d.measurements if not m.ok)

    @property
    def files_written(self) -> list[Path]:
        return [w.path for d in self.devices for w in d.files]


def _prestart_compile_services(request: TuneRequest, compiler: Compiler) -> PrestartedServices | None:
    """Compile services started before the GPU workers, so their processes' start-up (importing
    the kernel backend) overlaps the workers' (``tuner.compiling``). Not under the interpreter
    when ``compiler`` needs a GPU target (Triton's: nothing is compiled ahead there)."""
    if not request.compile_ahead or (request.interpret and compiler.needs_gpu):
        return None
    return PrestartedServices(compiler, request.compile_timeout_s)


def _compile_ahead(group: DeviceGroup, request: TuneRequest, progress: Progress, compiler: Compiler,
                   prestarted: PrestartedServices | None) -> CompileAhead | None:
    """Compile-ahead for one device group; None where nothing compiles ahead (``compile_ahead``
    off, or workers reporting no target ``compiler`` compiles for: the interpreter, a backend that
    cannot)."""
    if not request.compile_ahead:
        return None
    batch_sizes: dict[MoEShape, set[int]] = {}
    for job in group.strategy.jobs:
        batch_sizes.setdefault(job.shape, set()).update(job.batch_sizes)
    return start_compile_ahead(group.slots, {shape: tuple(sorted(ms)) for shape, ms in batch_sizes.items()},
                               request.compile_timeout_s, progress.note, compiler, prestarted)


def _choose_and_write(group: DeviceGroup, retimer: selection.Retimer, request: TuneRequest,
                      progress: Progress, only: set[tuple[MoEShape, str, int]] | None = None) -> DeviceResult:
    """Choose the winners and write them. ``only``: the (shape, routing, M) to choose for (the
    batch sizes whose search finished, when the run was cut short); None: every one."""
    whole = [m for m in group.measurements if m.candidate.gemm is Gemm.BOTH
             and (only is None or (m.candidate.shape, m.candidate.routing, m.candidate.M) in only)]
    pinned = {selection.GroupKey(job.shape, job.routing, Gemm.BOTH, M): configs
              for job in group.strategy.jobs for M, configs in job.baseline_by_m.items()
              if only is None or (job.shape, job.routing, M) in only}
    chosen = selection.select(whole, retimer, request.finalists, pinned)
    split = selection.split_choices(group.measurements, chosen) if request.split_gemms else {}
    missing = selection.groups_without_winner(whole)
    if missing:
        progress.note(f"no correct config on {group.device} at " + ", ".join(f"M={k.M}" for k in missing[:8])
                      + (" …" if len(missing) > 8 else ""))
    env = group.env.as_dict()
    files = request.write_outputs(group.device, env, chosen, split) if chosen else []
    return DeviceResult(group.device, env, len(group.slots), group.measurements, chosen, missing, files, split,
                        group.compiler.stats if group.compiler is not None else None)


def _check_outputs(groups: list[DeviceGroup], request: TuneRequest) -> None:
    """Refuse now, before any measurement, what writing would refuse at the end (``FileConflict``)."""
    check = getattr(request.write_outputs, "check", None)
    if check is None:
        return
    for group in groups:
        batch_sizes: dict[MoEShape, set[int]] = {}
        for job in group.strategy.jobs:
            batch_sizes.setdefault(job.shape, set()).update(job.batch_sizes)
        check(group.device, group.env.as_dict(), batch_sizes)


def _write_failed(exc: BaseException, journal: Journal) -> RunFailed:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    where = f" {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
    return RunFailed(f"writing the config files failed{where}: {reason}; rerun with a writable --out (or --replace): "
                     f"{journal.holds()}, nothing is measured twice")


def tune(request: TuneRequest, progress: Progress | None = None, timeline: Timeline | None = None,
         clock: Callable[[], float] = time.monotonic) -> TuneResult:
    """Run the whole tune: search, re-time finalists, write files. Needs an open
    ``tuner.ray_session`` (``timeline``: the one its start was recorded on; ``clock``: the time
    budget's and the re-timing cap's, injectable for tests). Raises RunFailed on
    run failures, UsageError when an existing file would be refused, ``signals.Terminated`` (with
    a resume hint) on SIGTERM."""
    progress = progress or Progress()
    result = TuneResult(budget_s=request.budget_s, timeline=timeline or Timeline())
    timeline = result.timeline
    with Journal(request.journal_path, fresh=request.fresh) as journal:
        if journal.set_aside is not None:
            progress.note(f"--fresh: previous journal kept as {journal.set_aside}")
        if journal.warning():
            progress.note(journal.warning())
        pool = None
        prestarted = None
        groups: list[DeviceGroup] = []
        try:
            progress.phase("starting the GPU workers")
            compiler = faults.compiler(request.kernel)
            with timeline.phase("compile_ahead"):
                prestarted = _prestart_compile_services(request, compiler)
            with timeline.phase("worker_start"):
                pool = start_pool(request.workers, request.kernel, request.timeout_s, progress.note)
                strategy_class = STRATEGIES[request.strategy]
                groups = device_groups(pool, lambda device: strategy_class(request.jobs_for_device(device),
                                                                           request.split_gemms))
            _check_outputs(groups, request)
            for g in groups:
                progress.note(f"{len(g.slots)} worker(s) on {g.device} (torch {g.env.get('torch')}, "
                              f"triton {g.env.get('triton')}, kernel {g.env.get('kernel')})")
                limits = DeviceLimits.for_device(g.device)
                if limits.note and not request.interpret:
                    progress.note(limits.note)
                with timeline.phase("compile_ahead"):
                    g.compiler = _compile_ahead(g, request, progress, compiler, prestarted)
            if all(g.compiler is None for g in groups):
                timeline.spans.pop("compile_ahead", None)
            if prestarted is not None:
                prestarted.release()  # services on nodes without a worker of any group
            engine = Engine(pool, groups, journal, progress, request.budget_s, clock=clock, timeline=timeline)
            progress.phase(f"searching ({request.strategy} strategy)")
            engine.run()
            progress.close()
            result.evaluations_run, result.evaluations_reused = engine.evaluations_run, engine.evaluations_reused
            result.budget_ended = engine.budget_ended
            deadline = None
            if engine.budget_ended and not engine.workers_lost:
                result.retime_cap_s = retime_cap_s(request.budget_s)
                deadline = clock() + result.retime_cap_s
                progress.note(f"re-timing the finalists found so far (at most {result.retime_cap_s:g}s), so the "
                              "winners are confirmed against the baseline back to back")
            for group in groups:
                if group.compiler is None:
                    continue  # else closed in ``finally``
                if engine.workers_lost:
                    group.compiler.release()
                else:
                    # What no process has started is dropped: re-timing waits for no speculation
                    # (``Retimer`` asks for the finalists this run has not compiled, then releases).
                    group.compiler.end_search()
            for group in groups:
                finished = None
                if engine.workers_lost:
                    group.strategy.propose()  # moves idle groups past rounds that need no GPU; proposals dropped
                    finished = group.strategy.finished()
                retimer = Retimer(pool, group, journal, progress, timeline, deadline, clock)
                try:
                    result.devices.append(_choose_and_write(
                        group, no_retiming if engine.workers_lost else retimer, request, progress, finished))
                except (OSError, FileConflict) as exc:
                    raise _write_failed(exc, journal) from None
                finally:
                    timeline.touch("writing")
                if group.compiler is not None:
                    group.compiler.release()  # where nothing was re-timed
                result.retimed_groups += retimer.fresh
                result.retimes_reused += retimer.reused
                result.retimes_cut += retimer.cut
            if engine.workers_lost:
                wrote = ", ".join(str(p) for p in result.files_written) or "no file (no batch size had finished)"
                raise RunFailed(f"every worker was lost; wrote {wrote}; {journal.resume_hint()}")
        except FileConflict as exc:
            raise UsageError(str(exc)) from None
        except BaseException as exc:
            if not signals.caused(exc):
                raise
            # However the signal surfaced (``Terminated``, or Ray's call ending in a SystemError around it).
            raise signals.Terminated(journal.resume_hint()) from None
        finally:
            for group in groups:
                if group.compiler is not None:
                    group.compiler.close()
            if prestarted is not None:
                prestarted.close()
            if pool is not None:
                pool.shutdown()
    result.wall_s = time.monotonic() - timeline.started
    return result
