"""Test-only fault injection for the BenchmarkWorker.

The fault-isolation tests must show that a candidate which raises, kills its process, hangs or
computes a wrong (finite) result cannot spoil a run, and that the files written equal a clean
run's. Wall-clock timing under the interpreter is noise, so this hook can also replace a measured
latency by a deterministic function of the candidate; the kernel still runs and is still checked
against the reference.

Active only when the environment variable ``MOE_TUNE_FAULTS`` names a JSON file (the driver
forwards the variable to its workers); production runs never set it. The file::

    {"deterministic_latency": true,
     "faults": [{"config": "<Config.label>", "M": 4, "action": "raise" | "kill" | "hang" | "corrupt"
                                                       | "kill_retiming" | "lose" | "poison"}]}

``M`` is optional (absent: every batch size). ``"compile_ahead": {"setup_s": S, "job_s": J}``
puts a stand-in compiler (``CompileStandIn``, a ``workers.compile_ahead.Compiler``) in the place
of Triton's, so the driver's compile-ahead path runs under the interpreter (which has no compiler
to run ahead) on the CPU: jobs are for a stand-in target, each compile process's start-up sleeps
S seconds (as importing a server's package does) and each job J seconds, ending "not compiled
ahead" (the worker then decides on the candidate, as without compile-ahead). The driver takes
its compiler from ``compiler``, the one place a plan reaches compile-ahead.
``"worker_start_s": W`` makes every worker's start take W seconds longer (as a GPU worker
importing a server's package does), so the start-up's overlaps can be tested on the CPU.
``"retime_s": R`` makes every re-timing call take R seconds longer (as a GPU worker compiling
its finalists itself does), so what the re-timing overlaps with can be tested on the CPU.
``corrupt`` lets the kernel run, then scales its output by ``CORRUPT_SCALE`` (a relative error of
0.5, finite, far above every dtype's bound).
``kill_retiming`` leaves the measurement alone and ends the process when the candidate is
re-timed among finalists. ``lose`` ends the process and makes every later worker start under
this plan fail (a marker file next to the plan), as a GPU or node gone for good would.
``poison`` launches a kernel with an out-of-bounds store: a genuine illegal memory access that
poisons the CUDA context (``workers.poison``; without a GPU, the CUDA error text, marked simulated).
A plan changes what is measured, so its ``digest`` is part of the worker's environment (and
thus of every journal key): fake latencies are never reused by a run without the same plan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from workers.backends import BUILTIN
from workers.compile_ahead import CompileJob, CompileOutcome, CompileTarget, Compiler, TritonCompiler
from workers.records import Candidate, Status

if TYPE_CHECKING:
    import torch

ENV_VAR = "MOE_TUNE_FAULTS"
ACTIONS = ("raise", "kill", "hang", "corrupt", "kill_retiming", "lose", "poison")
KILL_EXIT_CODE = 86
CORRUPT_SCALE = 1.5


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws where the kernel would run (and a worker start after
    a ``lose`` fault)."""


STAND_IN_TARGET = "stand-in"
"""The backend of the stand-in compiler's target."""


@dataclass(frozen=True)
class CompileStandIn:
    """The plan's stand-in for Triton's compiler (a ``workers.compile_ahead.Compiler``): a compile
    process takes ``setup_s`` seconds to start and ``job_s`` per job, and compiles nothing."""

    setup_s: float = 0.0
    job_s: float = 0.0
    kernel: str = BUILTIN
    needs_gpu: ClassVar[bool] = False

    def target(self, reported: CompileTarget | None) -> CompileTarget:
        """A stand-in target for every worker, whatever it reported (under the interpreter: none)."""
        return CompileTarget(STAND_IN_TARGET, 0, 32, 0, self.kernel)

    def setup(self) -> None:
        time.sleep(self.setup_s)

    def compile(self, job: CompileJob) -> CompileOutcome:
        started = time.monotonic()
        time.sleep(self.job_s)
        return CompileOutcome(Status.OK, "not compiled ahead (the fault plan's stand-in compiler)", 0,
                              time.monotonic() - started)


@dataclass(frozen=True)
class FaultPlan:
    deterministic_latency: bool = False
    actions: dict[tuple[str, int | None], str] = field(default_factory=dict)
    source: str | None = None  # the plan file (``lose`` puts its marker next to it)
    compile_ahead: CompileStandIn | None = None
    worker_start_s: float = 0.0
    retime_s: float = 0.0

    @classmethod
    def from_file(cls, path: str) -> "FaultPlan":
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        actions: dict[tuple[str, int | None], str] = {}
        for entry in data.get("faults", []):
            if entry["action"] not in ACTIONS:
                raise ValueError(f"unknown fault action {entry['action']!r}; expected one of {ACTIONS}")
            m = entry.get("M")
            actions[(entry["config"], None if m is None else int(m))] = entry["action"]
        stand_in = data.get("compile_ahead")
        return cls(deterministic_latency=bool(data.get("deterministic_latency", False)), actions=actions,
                   source=path, compile_ahead=CompileStandIn(**stand_in) if stand_in is not None else None,
                   worker_start_s=float(data.get("worker_start_s", 0.0)),
                   retime_s=float(data.get("retime_s", 0.0)))

    def action_for(self, candidate: Candidate) -> str | None:
        label = candidate.config.label
        return self.actions.get((label, candidate.M)) or self.actions.get((label, None))

    def digest(self) -> str:
        """A short hash of the whole plan (16 hex digits)."""
        actions = sorted([config, m, action] for (config, m), action in self.actions.items())
        text = json.dumps({"deterministic_latency": self.deterministic_latency, "actions": actions})
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def inject(self, candidate: Candidate) -> None:
        """Misbehave as planned for this candidate before its run; return normally when no fault
        is planned (or the fault acts on the output: ``corrupt_output``)."""
        action = self.action_for(candidate)
        if action == "raise":
            raise InjectedFault(f"injected fault for {candidate.config.label} at M={candidate.M}")
        if action == "kill":
            print(f"moe-tune fault injection: killing worker on {candidate.config.label}", file=sys.stderr,
                  flush=True)
            os._exit(KILL_EXIT_CODE)
        if action == "lose":
            Path(self._lost_marker()).touch()
            _exit(f"losing this worker for good on {candidate.config.label}")
        if action == "hang":
            while True:
                time.sleep(3600)
        if action == "poison":
            from workers.poison import poison_context

            poison_context()

    def inject_retiming(self, candidates: list[Candidate]) -> None:
        """Before a re-timing: end the process if any finalist has a ``kill_retiming`` fault; else
        take ``retime_s`` longer."""
        for candidate in candidates:
            if self.action_for(candidate) == "kill_retiming":
                _exit(f"killing worker while re-timing {candidate.config.label} at M={candidate.M}")
        time.sleep(self.retime_s)

    def check_start(self) -> None:
        """At a worker's start: take ``worker_start_s`` longer; refuse (raise InjectedFault) once a
        ``lose`` fault has fired."""
        time.sleep(self.worker_start_s)
        if self.source is not None and os.path.exists(self._lost_marker()):
            raise InjectedFault("injected fault: this worker is lost for good")

    def _lost_marker(self) -> str:
        if self.source is None:
            raise ValueError("a 'lose' fault needs a plan read from a file")
        return self.source + ".lost"

    def corrupt_output(self, candidate: Candidate, output: torch.Tensor) -> None:
        """After the candidate's run: scale ``output`` in place when its planned action is ``corrupt``."""
        if self.action_for(candidate) == "corrupt":
            output.mul_(CORRUPT_SCALE)

    def latency_us(self, candidate: Candidate) -> float | None:
        """A fixed latency in [100, 200) µs derived from the candidate, or None to keep the measured one.
        A routing other than ``uniform`` joins the hash (so each routing has its own winners)."""
        if not self.deterministic_latency:
            return None
        text = f"{candidate.config.label}|{candidate.M}|{candidate.gemm.value}|{candidate.shape.label}"
        if candidate.routing != "uniform":
            text += f"|{candidate.routing}"
        digest = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
        return 100.0 + (digest % 1_000_000) / 10_000.0


def _exit(what: str) -> None:
    print(f"moe-tune fault injection: {what}", file=sys.stderr, flush=True)
    os._exit(KILL_EXIT_CODE)


def read_plan() -> FaultPlan | None:
    """The plan ``MOE_TUNE_FAULTS`` names now, read afresh (the driver: one process may run many
    commands, each with its own plan), or None."""
    path = os.environ.get(ENV_VAR)
    return FaultPlan.from_file(path) if path else None


def compiler(kernel: str) -> Compiler:
    """Compile-ahead's compiler for ``kernel`` in this run: the stand-in of the plan
    ``MOE_TUNE_FAULTS`` names now, where it has one, else Triton's (``TritonCompiler``)."""
    plan = read_plan()
    if plan is not None and plan.compile_ahead is not None:
        return replace(plan.compile_ahead, kernel=kernel)
    return TritonCompiler(kernel)


@functools.cache
def active_plan() -> FaultPlan | None:
    """The plan named by ``MOE_TUNE_FAULTS`` (read once per process: workers), or None."""
    return read_plan()
