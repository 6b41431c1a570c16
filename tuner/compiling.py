"""Compile-ahead, driver side: which configs are compiled, where, and what came of it.

The engine asks ``status(shape, config)`` for every candidate it is about to queue. The first
ask submits one job per (shape, config) — no kernel depends on the batch size, so the job
covers every batch size of the search at once — to the compile service of every node that hosts
one of the device group's GPU workers (each node has its own Triton cache). The answer is None
while no node has finished it; then the first outcome: ok (queue it; the worker will find the
binaries in its cache) or a verdict (compile error, out of resources, compile time-out), which
settles the candidate without the GPU.

Speculation: while a service has processes no job waits for, ``speculate`` hands it configs the
strategy is likely to propose next (``Strategy.likely_next``) as speculative jobs, which its pool
runs only while no needed job waits (``workers.compile_pool``). A speculative config the engine
then asks about is promoted to a needed job if it is not done yet; either way it counts as used.
Speculation changes only where and when a config compiles, never what the search proposes or
decides: a speculative outcome is the same outcome the needed job would have had.

When the search ends, ``end_search`` drops every job no process has started (nothing waits for
them); the re-timing (``tuner.engine.Retimer``) then asks ``status`` for the finalists this run
has not compiled, as needed jobs, and ``release`` stops the services once nothing waits. A job
that one node dropped while another still compiles it stays asked: the re-timing's ask submits
it again to the nodes that dropped it, never to one that holds it (``_Service.holds``), so no
node compiles a config twice.

``start_compile_ahead`` places it: one service per node of the group's workers, running the
run's ``workers.compile_ahead.Compiler`` (the driver chooses it once) for the target the workers
report. Starting a service's processes costs what importing the kernel backend costs (vLLM's or
SGLang's package: ~10 s), so ``PrestartedServices`` starts them while the GPU workers start (the
driver calls it before ``tuner.pool.start_pool``): one service on every node with GPUs, sized to
its CPUs minus its GPUs, whose processes import the backend at once (``Compiler.setup``). No
target is needed for that: every job
carries the target, which the workers report once up. ``start_compile_ahead`` adopts the
prestarted service of each of its workers' nodes (else starts one, sized to the node's CPUs minus
one per GPU worker there); services on nodes without workers are closed when the driver is done.

A node's service that fails (it could not start, or died) is dropped with a note; with none left
the engine simply goes on without compile-ahead: the GPU workers compile for themselves, as
they always could.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tuner import signals
from tuner.pool import STARTUP_TIMEOUT_S, Slot
from workers.compile_ahead import CompileJob, CompileOutcome, CompileService, Compiler, CompileTarget, WorkerTarget
from workers.records import Config, MoEShape, Status

COLLECT_WAIT_S = 0.5
SERVICE_START_TIMEOUT_S = 120.0
SERVICE_CLOSE_TIMEOUT_S = 10.0
DEFAULT_COMPILE_TIMEOUT_S = 180.0
NOT_AHEAD = CompileOutcome(Status.OK, "compile-ahead unavailable")


@dataclass
class CompileStats:
    """What compile-ahead did in one run (the run summary's ``compile_ahead``)."""

    jobs: int = 0
    processes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    compile_s: float = 0.0
    not_ahead: int = 0
    """Jobs that could not be compiled ahead for a reason that says nothing about the config."""
    speculative: int = 0
    """Of ``jobs``, those submitted before the strategy proposed them (``CompileAhead.speculate``)."""
    speculative_used: int = 0
    """Speculative jobs whose config the strategy did propose later."""
    taken_uncompiled: int = 0
    """Candidates an idle GPU worker took (and compiled itself) before compile-ahead had finished them."""
    dropped: int = 0
    """Jobs no process had started on any node when the search ended (``CompileAhead.end_search``)."""
    retiming_jobs: int = 0
    """Of ``jobs``, finalists' configs the re-timing asked for: neither run by this run's search on
    the group's GPUs nor compiled ahead by then (reused from the journal)."""
    retiming_compiled: int = 0
    """Batch sizes whose finalists needed ``retiming_jobs`` and were handed to a worker all compiled."""
    retiming_taken_uncompiled: int = 0
    """Batch sizes an idle worker took for re-timing (compiling itself) before compile-ahead had finished them."""

    def to_json(self) -> dict:
        return {"jobs": self.jobs, "processes": self.processes, "outcomes": dict(sorted(self.outcomes.items())),
                "compile_s": round(self.compile_s, 1), "not_compiled_ahead": self.not_ahead,
                "speculative": {"jobs": self.speculative, "used": self.speculative_used,
                                "unused": self.speculative - self.speculative_used},
                "taken_uncompiled": self.taken_uncompiled, "dropped_at_search_end": self.dropped,
                "retiming": {"jobs": self.retiming_jobs, "batch_sizes_compiled_ahead": self.retiming_compiled,
                             "batch_sizes_taken_uncompiled": self.retiming_taken_uncompiled}}


@dataclass
class _Service:
    node: str
    actor: Any
    size: int
    collecting: Any = None
    holds: set[tuple[MoEShape, Config]] = field(default_factory=set)
    """Jobs submitted to this service whose outcome has not come in (waiting or running there)."""


def _start_service(node: str, processes: int, timeout_s: float, compiler: Compiler) -> _Service:
    """A compile service pinned to ``node`` (returns at once; its processes start in the background)."""
    actor = ray.remote(CompileService).options(
        num_cpus=0, max_concurrency=2, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(processes, timeout_s, compiler)
    return _Service(node, actor, processes)


def _close_services(services: list[_Service]) -> None:
    """Stop the compile processes (a killed actor would leave a hung compile running), then the actors."""
    try:
        ray.get([s.actor.close.remote() for s in services], timeout=SERVICE_CLOSE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
    for service in services:
        try:
            ray.kill(service.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class PrestartedServices:
    """Compile services started before the GPU workers are up, one per alive node with GPUs
    (processes: the node's CPUs minus its GPUs), their processes running ``compiler.setup``
    (importing the kernel backend) meanwhile. ``take`` hands one to the group whose workers run
    on that node."""

    def __init__(self, compiler: Compiler, timeout_s: float) -> None:
        self.compiler = compiler
        self._services: dict[str, _Service] = {}
        for node in ray.nodes():
            resources = node.get("Resources", {})
            gpus = int(resources.get("GPU", 0))
            if node.get("Alive") and gpus > 0:
                processes = max(1, int(resources.get("CPU", 1)) - gpus)
                self._services[node["NodeID"]] = _start_service(node["NodeID"], processes, timeout_s, compiler)

    def take(self, node: str, compiler: Compiler) -> _Service | None:
        """The service started on ``node`` for ``compiler`` (once), or None."""
        return self._services.pop(node, None) if compiler == self.compiler else None

    def release(self) -> None:
        """Tell the services no group took to stop, without waiting (the search is about to start)."""
        for service in self._services.values():
            service.actor.close.remote()

    def close(self) -> None:
        """Close the services no group took (waiting for their processes, then killing the actors)."""
        _close_services(list(self._services.values()))
        self._services = {}


class CompileAhead:
    """Compile-ahead for one device group (one GPU target) over the services on its workers' nodes."""

    def __init__(self, target: CompileTarget, services: list[_Service], batch_sizes: dict[MoEShape, tuple[int, ...]],
                 note: Callable[[str], None]) -> None:
        self.target = target
        self.batch_sizes = batch_sizes
        self.note = note
        self.stats = CompileStats()
        self._outcomes: dict[tuple[MoEShape, Config], CompileOutcome] = {}
        self._asked: set[tuple[MoEShape, Config]] = set()
        self._speculated: set[tuple[MoEShape, Config]] = set()  # speculative, not proposed yet
        self._services = list(services)
        self._dropped: list[_Service] = []  # told to stop when dropped; killed by ``close``
        self._released = False
        try:
            sizes = ray.get([s.actor.size.remote() for s in self._services], timeout=SERVICE_START_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - compile-ahead is an optimisation; the run goes on without it
            signals.check()  # a SIGTERM that surfaced inside Ray's call stops the run
            self.note(f"compile-ahead unavailable ({type(exc).__name__}: {exc}); the GPU workers compile themselves")
            self.close()
            sizes = []
        for service, size in zip(self._services, sizes):
            service.size = size
        self.stats.processes = sum(s.size for s in self._services)

    @property
    def available(self) -> bool:
        return bool(self._services)

    def status(self, shape: MoEShape, config: Config) -> CompileOutcome | None:
        """The outcome of compiling ``config`` for ``shape``; None while it is being compiled."""
        key = (shape, config)
        if key in self._speculated:
            self._speculated.remove(key)
            self.stats.speculative_used += 1
            if key not in self._outcomes:
                for service in self._services:
                    if key in service.holds:
                        service.actor.promote.remote([key])
        if key in self._outcomes:
            return self._outcomes[key]
        if not self._services or self._released:  # nothing will compile it: the GPU worker compiles
            return NOT_AHEAD
        if key not in self._asked:
            self._asked.add(key)
            self.stats.jobs += 1
        # every service without it: all of them for a new job; after ``end_search``, those that
        # dropped a job another one still compiles
        missing = [service for service in self._services if key not in service.holds]
        if missing:
            job = CompileJob(shape, config, self.batch_sizes[shape], self.target)
            for service in missing:
                service.actor.submit.remote([(key, job)])
                service.holds.add(key)
        return None

    @property
    def outstanding(self) -> bool:
        """Jobs submitted whose outcome has not come in (needed or speculative)."""
        return any(s.holds for s in self._services)

    def spare(self) -> int:
        """Processes no job waits for, on the busiest service (every job goes to every service)."""
        return min((s.size - len(s.holds) for s in self._services), default=0)

    def speculate(self, likely: Iterable[tuple[MoEShape, Config]]) -> int:
        """Submit the first configs of ``likely`` (most likely first) not asked about yet as
        speculative jobs, as many as there are ``spare`` processes; returns how many."""
        room = self.spare()
        jobs = []
        for key in likely:
            if room <= 0:
                break
            if key in self._asked or key[0] not in self.batch_sizes:
                continue
            self._asked.add(key)
            self._speculated.add(key)
            jobs.append((key, CompileJob(key[0], key[1], self.batch_sizes[key[0]], self.target)))
            room -= 1
        if jobs:
            self.stats.jobs += len(jobs)
            self.stats.speculative += len(jobs)
            for service in self._services:
                service.actor.submit.remote(jobs, True)
                service.holds.update(key for key, _ in jobs)
        return len(jobs)

    def pump(self, wait_s: float) -> bool:
        """Take in finished outcomes (waiting up to ``wait_s`` for one); True if any arrived. A
        collect call stays in flight on every service with outstanding jobs, so the next ``pump(0)``
        finds what finished meanwhile."""
        self._collect()
        arrived = self._take_in(wait_s)
        self._collect()
        return arrived

    def _collect(self) -> None:
        for service in self._services:
            if service.collecting is None and service.holds:
                service.collecting = service.actor.collect.remote(COLLECT_WAIT_S)

    def _take_in(self, wait_s: float) -> bool:
        refs = [s.collecting for s in self._services if s.collecting is not None]
        if not refs:
            return False
        ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
        if not ready:
            return False
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        arrived = False
        for service in list(self._services):
            if service.collecting not in ready:
                continue
            try:
                results = ray.get(service.collecting)
            except Exception as exc:  # noqa: BLE001
                self._drop(service, exc)
                continue
            service.collecting = None
            for key, outcome in results:
                service.holds.discard(key)
                arrived |= self._record(key, outcome)
        return arrived

    def _record(self, key: tuple[MoEShape, Config], outcome: CompileOutcome) -> bool:
        if key in self._outcomes:
            return False  # another node finished it first
        self._outcomes[key] = outcome
        self.stats.outcomes[outcome.status.value] += 1
        self.stats.compile_s += outcome.seconds
        if outcome.message and not outcome.verdict:
            self.stats.not_ahead += 1
        return True

    def _drop(self, service: _Service, exc: Exception) -> None:
        """Go on without ``service``, whose call raised ``exc``; a SIGTERM that surfaced inside
        Ray's call stops the run instead."""
        signals.check()
        reason = f"{type(exc).__name__}: {exc}"
        self.note(f"compile service on node {service.node[:8]} failed ({reason.splitlines()[0][:200]}); "
                  "going on without it")
        self._services.remove(service)
        self._dropped.append(service)
        try:
            service.actor.close.remote()  # one that still runs stops its processes: nobody takes in their outcomes
        except Exception:  # noqa: BLE001 - best effort; ``close`` kills the actor
            pass
        if not self._services:
            for key in self._asked - set(self._outcomes):
                self._outcomes[key] = NOT_AHEAD

    def end_search(self) -> None:
        """The search is over: every job no process has started (speculation, and configs of
        candidates a time budget dropped) is dropped on every service, so what the re-timing
        asks for next (``status``: a needed job again) waits behind nothing; running jobs finish.
        A job no service holds any more is forgotten (counted in ``stats.dropped``); one still
        running on another node stays asked, its outcome to come from there. Waits at most
        ``SERVICE_CLOSE_TIMEOUT_S`` in all; a service that does not answer is dropped."""
        deadline = time.monotonic() + SERVICE_CLOSE_TIMEOUT_S
        calls = [(service, service.actor.drop_waiting.remote()) for service in self._services]
        dropped: set[tuple[MoEShape, Config]] = set()
        for service, ref in calls:
            try:
                keys = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001
                self._drop(service, exc)
                continue
            service.holds.difference_update(keys)
            dropped.update(keys)
        dropped -= set(self._outcomes)
        for service in self._services:
            dropped -= service.holds  # still compiling there
        self.stats.dropped += len(dropped)
        self._asked -= dropped
        self._speculated -= dropped

    def release(self) -> None:
        """Tell the services to stop their processes, without waiting (nothing needs what they
        still compile): the re-timing need not wait for it. ``close`` still waits for them and
        ends the actors. Once only; ``status`` answers ``NOT_AHEAD`` after it for anything not
        compiled yet."""
        if self._released:
            return
        self._released = True
        for service in self._services:
            service.actor.close.remote()

    def close(self) -> None:
        """Stop the compile processes, then the actors (those dropped too)."""
        _close_services(self._services)
        for service in self._dropped:  # not waited for: one that does not answer would hold up the rest
            try:
                ray.kill(service.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        self._services, self._dropped = [], []


def start_compile_ahead(slots: list[Slot], batch_sizes: dict[MoEShape, tuple[int, ...]], timeout_s: float,
                        note: Callable[[str], None], compiler: Compiler,
                        prestarted: PrestartedServices | None = None) -> CompileAhead | None:
    """Compile-ahead by ``compiler`` for the GPU workers in ``slots`` (one device group): a service
    on each of their nodes, the one ``prestarted`` there if any, else a new one sized to the node's
    CPUs minus one per GPU worker there. None where nothing can be compiled ahead: a worker whose
    report gives the compiler no target (``Compiler.target``: for Triton's, the interpreter or a
    server's kernel), a worker that does not answer, or no service that starts (the workers then
    compile for themselves)."""
    try:
        reports: list[WorkerTarget] = ray.get([slot.actor.compile_target.remote() for slot in slots],
                                              timeout=STARTUP_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - compile-ahead is an optimisation; the workers can compile themselves
        signals.check()  # a SIGTERM that surfaced inside Ray's call stops the run
        note(f"compile-ahead skipped on {slots[0].device}: {type(exc).__name__}: {exc}".splitlines()[0][:300])
        return None
    targets = [compiler.target(r.target) for r in reports]
    if any(t is None for t in targets):
        return None
    target = targets[0]
    cpus = {node["NodeID"]: int(node.get("Resources", {}).get("CPU", 1)) for node in ray.nodes() if node.get("Alive")}
    workers_on = Counter(r.node_id for r in reports)
    services = [(prestarted.take(node, compiler) if prestarted is not None else None)
                or _start_service(node, max(1, cpus.get(node, 1) - count), timeout_s, compiler)
                for node, count in workers_on.items()]
    compiler = CompileAhead(target, services, batch_sizes, note)
    if not compiler.available:
        return None
    note(f"compile-ahead: {compiler.stats.processes} CPU processes for {slots[0].device} "
         f"({target.backend} arch {target.arch})")
    return compiler
