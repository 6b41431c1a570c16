"""BenchmarkWorker: measures candidates on the one GPU it holds (a plain class; the driver makes it a Ray actor).

Per candidate: build (or reuse) the problem, run the kernel once with the candidate's config,
compare with the fp32 reference (``rel_error`` above ``ERROR_BOUNDS[dtype]`` or not finite →
``wrong_result``, never a winner), then time it (``workers.timing``) and return a Measurement.
A candidate for one GEMM (``gemm`` up or down) is checked on the whole op with its config on
both GEMMs, and only its GEMM is timed (the down GEMM on the intermediate the check left behind).

Failures, and what happens to the process (``workers.failures`` decides the status):
- Compile errors, out-of-resources and any other Python exception are recorded as the
  candidate's status; the process lives on. ``InputChanged`` (a pinned routing file changed
  under the run) is raised to the driver, which ends the run.
- A CUDA error that poisons the context (illegal memory access, misaligned address, unspecified
  launch failure, …): every later CUDA call in this process would fail too, so the process ends
  (``os._exit``) and Ray restarts it; the driver retries the candidate once on another worker.
- A hang: a watchdog thread ends the process when one candidate runs past ``timeout_s``.

Problems are cached per (shape, routing, M): the driver hands out work grouped that way, so a
worker builds weights, inputs and the reference once per group, not per candidate.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import triton

from workers import backends, faults
from workers.compile_ahead import CompileTarget, WorkerTarget
from workers.failures import ConfigRejected, InputChanged, classify, describe
from workers.problem import ERROR_BOUNDS, Problem, build_problem, rel_error, release_weights
from workers.workspace import Workspace
from workers.records import Candidate, Config, DType, Gemm, Level, Measurement, MoEShape, Status, WeightGrid
from workers.timing import Timing, time_call, time_interleaved, time_screen

WATCHDOG_EXIT_CODE = 87
POISON_EXIT_CODE = 88


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Watchdog:
    """Ends the process when the guarded work outlives its deadline (a hung kernel never returns)."""

    def __init__(self, timeout_s: float, poll_s: float = 0.25) -> None:
        self.timeout_s = timeout_s
        self._deadline: float | None = None
        self._what = ""
        self._poll_s = poll_s
        threading.Thread(target=self._watch, name="moe-tune-watchdog", daemon=True).start()

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        self._what = what
        self._deadline = time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll_s)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f"moe-tune worker: {self._what} ran past {self.timeout_s:g}s; ending this process",
                      file=sys.stderr, flush=True)
                os._exit(WATCHDOG_EXIT_CODE)


class BenchmarkWorker:
    """Holds one GPU (or, with ``TRITON_INTERPRET=1``, the CPU) and measures candidates on it."""

    def __init__(self, kernel: str = backends.BUILTIN, timeout_s: float = 300.0) -> None:
        if torch.cuda.is_available() and not interpreting():
            self.device = "cuda"
            self.device_name = torch.cuda.get_device_name()
        elif interpreting():
            self.device = "cpu"
            self.device_name = "cpu"
            # numpy's overflow notices from a candidate computing garbage under the interpreter: the
            # fp32 reference check already records such a candidate as wrong_result
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
        else:
            raise RuntimeError("this worker sees no CUDA GPU (run with --interpret to use the Triton interpreter)")
        self.kernel = kernel
        self.backend = backends.load(kernel)
        self.watchdog = Watchdog(timeout_s)
        self._crashes_shown: set[str] = set()  # messages whose traceback this process printed
        self.fault_plan = faults.active_plan()
        if self.fault_plan is not None:
            self.fault_plan.check_start()
        self._problem_key: tuple | None = None
        self._problem: Problem | None = None
        self._workspace = Workspace()
        """Buffers shared by every runner of ``_problem`` (``workers.workspace``: candidates compared
        back to back then differ in their config only, not in where their buffers live)."""

    def describe(self) -> dict[str, str]:
        """Everything about this worker that changes a timing (part of every journal key)."""
        env = {"device": self.device_name, "torch": torch.__version__, "triton": triton.__version__,
               **self.backend.describe()}
        if self.fault_plan is not None:
            env["fault_plan"] = self.fault_plan.digest()  # fake latencies never share a key with real ones
        return env

    def ping(self) -> int:
        return os.getpid()

    def compile_target(self) -> WorkerTarget:
        """What compile-ahead processes need to build this worker's kernels without its GPU: its
        Triton target (None under the interpreter or for a backend whose entry point cannot be
        driven on meta tensors), and the Ray node they must run on to share its Triton cache."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        if self.device != "cuda" or not self.backend.compiles_ahead:
            return WorkerTarget(None, node)
        from triton.runtime.driver import driver

        target = driver.active.get_current_target()
        properties = driver.active.utils.get_device_properties(torch.cuda.current_device())
        return WorkerTarget(CompileTarget(target.backend, target.arch, target.warp_size,
                                          int(properties["max_shared_mem"]), self.kernel), node)

    def device_memory(self) -> tuple[int, str]:
        """Bytes of memory of the device this worker runs kernels on, and where the number comes
        from: the GPU's own report, or (under the Triton interpreter) the host's physical memory."""
        if self.device == "cuda":
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "reported by the GPU"
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the host's memory: a CPU run"

    def relative_errors(self, shapes: dict[DType, MoEShape], configs: dict[DType, Config], M: int, routing: str,
                        reference: DType, grid: WeightGrid | None = None) -> tuple[dict[DType, float], int]:
        """At batch size ``M``: per dtype, the relative error of ``fused_moe`` with that dtype's
        config against the ``reference`` dtype's output on the same inputs (same x, routing and
        master weights, on ``grid`` when given (``build_problem``), quantized per dtype; seed = M,
        as the correctness check uses), and the number of distinct experts the routing touches.
        ``configs`` must hold ``reference``."""
        from workers.moe import fused_moe

        self._forget_problem()
        outputs = {}
        touched = 0
        with self.watchdog.guard(f"comparing {len(configs)} dtypes at M={M}"):
            for dtype, config in configs.items():
                problem = build_problem(shapes[dtype], M, routing=routing, seed=M, device=self.device, grid=grid)
                touched = int(torch.unique(problem.topk_ids).numel())
                outputs[dtype] = fused_moe(problem.x, problem.w13, problem.w2, problem.topk_weights,
                                           problem.topk_ids, config).float()
                del problem
            release_weights()
        return {dtype: rel_error(out, outputs[reference]) for dtype, out in outputs.items()}, touched

    # -- measuring -----------------------------------------------------------------------------

    def measure(self, candidate: Candidate) -> Measurement:
        with self.watchdog.guard(f"{candidate.config.label} at M={candidate.M}"):
            try:
                return self._measure(candidate)
            except InputChanged:
                raise  # the run's input changed (workers.failures): no status of this candidate's
            except Exception as exc:  # noqa: BLE001 - every other failure becomes a recorded status
                return self._failure(candidate, exc)

    def retime(self, candidates: list[Candidate], rounds: int | None = None) -> list[float]:
        """µs per call of each candidate, timed back to back and interleaved (see ``time_interleaved``).

        The candidates are finalists of one group (same shape, routing, M, GEMM part): they all
        passed the correctness check already, so a failure here is a crash, not a status.
        """
        what = f"re-timing {len(candidates)} finalists at M={candidates[0].M}"
        with self.watchdog.guard(what):
            try:
                runners = [self._prepare(c)[1] for c in candidates]
                if self.fault_plan is not None:
                    self.fault_plan.inject_retiming(candidates)
                for runner in runners:
                    runner.run()
                self._synchronize()
                overrides = [self.fault_plan.latency_us(c) if self.fault_plan else None for c in candidates]
                if all(o is not None for o in overrides):
                    return overrides
                calls = [self._timed_call(r, c) for r, c in zip(runners, candidates)]
                return [t.median_us for t in time_interleaved(calls, self.device, rounds)]
            except Exception as exc:  # noqa: BLE001
                if classify(exc) is None:
                    self._die_poisoned(exc)
                raise

    def _measure(self, candidate: Candidate) -> Measurement:
        problem, runner = self._prepare(candidate)
        if self.fault_plan is not None:
            self.fault_plan.inject(candidate)
        runner.output.fill_(float("nan"))
        runner.run()
        self._synchronize()
        if self.fault_plan is not None:
            self.fault_plan.corrupt_output(candidate, runner.output)
        err = rel_error(runner.output, problem.reference)
        bound = ERROR_BOUNDS[candidate.shape.dtype]
        if not math.isfinite(err) or err > bound:
            return self._measurement(candidate, Status.WRONG_RESULT, rel_err=err,
                                     message=f"relative error {err:.3g} exceeds {bound:.3g}")
        override = self.fault_plan.latency_us(candidate) if self.fault_plan else None
        timer = time_screen if candidate.level is Level.SCREEN else time_call
        timing = Timing(override, 0.0, 0) if override is not None else timer(self._timed_call(runner, candidate),
                                                                             self.device)
        return self._measurement(candidate, Status.OK, latency_us=timing.median_us, spread_us=timing.spread_us,
                                 rel_err=err)

    def _prepare(self, candidate: Candidate) -> tuple[Problem, object]:
        key = (candidate.shape, candidate.routing, candidate.M)
        if key != self._problem_key:
            self._forget_problem()
            self._problem = build_problem(candidate.shape, candidate.M, routing=candidate.routing, seed=0,
                                          device=self.device)
            self._problem_key = key
        problem, config = self._problem, candidate.config
        try:
            self.backend.validate(config, candidate.shape)
        except ValueError as exc:
            raise ConfigRejected(str(exc)) from None
        return problem, self.backend.runner(problem, config, workspace=self._workspace)

    def _forget_problem(self) -> None:
        """Drop the cached problem and its runners' buffers (before building another)."""
        self._problem, self._problem_key, self._workspace = None, None, Workspace()

    def _timed_call(self, runner: object, candidate: Candidate) -> Callable[[], object]:
        """The part of the MoE this candidate is tuned for (the down GEMM reads the up GEMM's output,
        left in the runner's buffers by the correctness run)."""
        if candidate.gemm is Gemm.BOTH:
            return runner.run
        if not self.backend.splits:
            raise ValueError(f"--kernel {self.kernel} times the whole MoE call only, not the {candidate.gemm.value} GEMM")
        return runner.run_up if candidate.gemm is Gemm.UP else runner.run_down

    def _synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _failure(self, candidate: Candidate, exc: Exception) -> Measurement:
        status = classify(exc)
        if status is None:
            self._die_poisoned(exc)
        message = describe(exc)
        if status is Status.CRASHED and message not in self._crashes_shown:
            # one traceback per distinct failure: a backend refusing a whole dtype would print one per candidate
            self._crashes_shown.add(message)
            traceback.print_exc(file=sys.stderr)
        return self._measurement(candidate, status, message=message)

    def _die_poisoned(self, exc: BaseException) -> None:
        print(f"moe-tune worker: CUDA context poisoned ({type(exc).__name__}: {exc}); ending this process",
              file=sys.stderr, flush=True)
        os._exit(POISON_EXIT_CODE)

    def _measurement(self, candidate: Candidate, status: Status, **fields: object) -> Measurement:
        return Measurement(candidate=candidate, status=status, device=self.device_name,
                           versions={"torch": torch.__version__, "triton": triton.__version__}, **fields)
