"""Compile a candidate's kernels without its GPU, so the GPU worker finds them in Triton's cache.

On the GPU, compiling (an up and a down GEMM per config, ~1.4 s) costs more than timing. These
jobs run in CPU processes on the GPU's node (``CompileService``: a Ray actor the driver pins to
that node, running a ``workers.compile_pool.CompilePool`` on the node's spare cores) and leave
their binaries in the Triton cache on disk that the node's GPU worker reads (same user, same
``TRITON_CACHE_DIR``), where its first launch of that config finds them.

How, without a GPU and without model-size tensors:
- The problem is built on torch's ``meta`` device: real shapes, dtypes and strides, no memory.
  The worker's kernel backend (``CompileTarget.kernel``: ``MoERunner`` for ``builtin``, the
  server's own launcher for ``vllm``/``sglang`` where only their Python code runs) builds its
  runner from it exactly as the worker does, so every kernel (sort, GEMMs, SwiGLU, fp8
  quantization) is specialized from the very arguments the GPU will pass; meta tensors report
  their view offsets as pointers, so pointer alignment specializes alike too.
- Each ``kernel[grid](...)`` launch becomes ``kernel.warmup(...)``: Triton computes the
  specialization and compiles, and launches nothing.
- Triton asks its active driver for the device and target before compiling; in a process that
  sees no GPU (Ray hides GPUs from CPU tasks) a stand-in driver answers with the GPU worker's
  own target (backend, arch, warp size), which with the same Triton, source, options and
  environment gives the same cache key the worker computes.

Verdicts (``workers.failures.COMPILE_VERDICTS``): a config the kernel rejects, a compile error or
a kernel needing more shared memory than the worker's GPU has (``CompiledKernel.metadata.shared``,
the check Triton itself makes when loading) are final, so the GPU never sees them; so is a compile
the pool had to kill. Anything else that goes wrong here is not a verdict on the config: the
candidate goes to the GPU, which decides as it always did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Protocol

from workers.backends import BUILTIN
from workers.compile_pool import CompilePool, PoolFailure
from workers.failures import COMPILE_VERDICTS, ConfigRejected, classify, describe
from workers.records import Config, MoEShape, Status

COMPILE_NICENESS = 10
"""How much a compile process lowers its CPU priority (``os.nice``) below the GPU workers'."""


@dataclass(frozen=True)
class CompileTarget:
    """The GPU a compile is for, as its worker reports it (``BenchmarkWorker.compile_target``):
    Triton's target (backend, arch, warp size) and the device's shared memory per block in bytes."""

    backend: str
    arch: int
    warp_size: int
    max_shared_mem: int
    kernel: str = BUILTIN
    """The worker's kernel backend (``workers.backends``): what the compile process drives."""


@dataclass(frozen=True)
class WorkerTarget:
    """What one worker reports for compile-ahead (``BenchmarkWorker.compile_target``): its Triton
    target, None where it has none (the interpreter, a backend whose entry point cannot be driven
    on meta tensors), and its Ray node (whose Triton cache the worker reads)."""

    target: CompileTarget | None
    node_id: str


@dataclass(frozen=True)
class CompileJob:
    """Compile every kernel of one config for one shape, as launched at each of ``batch_sizes``.
    No kernel specializes on the batch size (``tests/test_compile_ahead.py``), so the first M
    compiles and the others are cache hits costing milliseconds; walking them all keeps any
    future M-dependent specialization covered."""

    shape: MoEShape
    config: Config
    batch_sizes: tuple[int, ...]
    target: CompileTarget


@dataclass(frozen=True)
class CompileOutcome:
    """``status`` is ok, or a verdict (``VERDICTS``); ``message`` says why, or what could not be
    compiled ahead (then the status stays ok and the GPU decides)."""

    status: Status
    message: str = ""
    kernels: int = 0
    seconds: float = 0.0

    @property
    def verdict(self) -> bool:
        return self.status in COMPILE_VERDICTS


class Compiler(Protocol):
    """What compile-ahead runs: ``TritonCompiler``, or in tests a stand-in (``workers.faults``).
    The driver chooses it once per run and pickles it to every node's ``CompileService``.
    ``target`` runs in the driver, ``setup`` and ``compile`` in the compile processes."""

    kernel: str
    """The kernel backend (``workers.backends``) whose kernels it compiles."""
    needs_gpu: ClassVar[bool]
    """Whether it compiles only for a GPU's Triton target (then nothing is compiled ahead under the
    Triton interpreter, and no compile process is started there)."""

    def target(self, reported: CompileTarget | None) -> CompileTarget | None:
        """The target jobs are compiled for, given the one a worker reported (``WorkerTarget``);
        None: nothing is compiled ahead for that worker's device group."""
        ...

    def setup(self) -> None:
        """Once in each compile process, before its first job."""
        ...

    def compile(self, job: CompileJob) -> CompileOutcome:
        """Compile ``job`` in this process; never raises for a bad config."""
        ...


@dataclass(frozen=True)
class TritonCompiler:
    """Triton's compiler, driven as this module's docstring says: the ``Compiler`` of every run."""

    kernel: str = BUILTIN
    needs_gpu: ClassVar[bool] = True

    def target(self, reported: CompileTarget | None) -> CompileTarget | None:
        return reported

    def setup(self) -> None:
        setup_compile_process(self.kernel)

    def compile(self, job: CompileJob) -> CompileOutcome:
        return compile_job(job)


class _TargetOnlyDriver:
    """Answers the questions Triton's JIT puts to the active driver before it compiles; it can
    launch nothing, and nothing here launches."""

    def __init__(self, target: CompileTarget) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(target.backend, target.arch, target.warp_size)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


_process_target: CompileTarget | None = None


def _use_target(target: CompileTarget) -> None:
    """Make the stand-in driver this process's active driver (once: Triton's JIT keeps the first
    target it sees per device, so a process serves one target; the service has a pool per target)."""
    global _process_target
    if _process_target is None:
        from triton.runtime.driver import driver

        driver.set_active(_TargetOnlyDriver(target))
        _process_target = target
    elif _process_target != target:
        raise RuntimeError(f"this compile process serves {_process_target}, not {target}")


@contextmanager
def _compile_instead_of_launch(compiled: list) -> Iterator[None]:
    """Within: ``kernel[grid](*args)`` compiles (``warmup``) and records the compiled kernel."""
    from triton.runtime.jit import JITFunction

    def compile_only(kernel: JITFunction, grid: object):
        def warm_up(*args, **kwargs):
            compiled.append(kernel.warmup(*args, grid=grid, **kwargs))
        return warm_up

    original = JITFunction.__getitem__
    JITFunction.__getitem__ = compile_only
    try:
        yield
    finally:
        JITFunction.__getitem__ = original


@dataclass(frozen=True)
class _MetaInputs:
    """``workers.backends.base.MoEInputs`` on torch's ``meta`` device."""

    shape: MoEShape
    x: object
    w13: object
    w2: object
    topk_weights: object
    topk_ids: object


def _meta_runner(shape: MoEShape, M: int, config: Config, kernel: str = BUILTIN):
    """The ``kernel`` backend's runner for ``shape`` at batch size ``M``, all its tensors on ``meta``."""
    import torch

    from workers import backends
    from workers.quant import activation_dtype, quantize_weight

    act = activation_dtype(shape.dtype)
    w13 = quantize_weight(torch.empty((shape.E, shape.up_rows, shape.K), dtype=act, device="meta"), shape.dtype,
                          shape.block_shape, per_channel=shape.per_channel)
    w2 = quantize_weight(torch.empty((shape.E, shape.K, shape.N), dtype=act, device="meta"), shape.dtype,
                         shape.block_shape, per_channel=shape.per_channel)
    x = torch.empty((M, shape.K), dtype=act, device="meta")
    topk_weights = torch.empty((M, shape.topk), dtype=torch.float32, device="meta")
    topk_ids = torch.empty((M, shape.topk), dtype=torch.int32, device="meta")
    return backends.load(kernel).runner(_MetaInputs(shape, x, w13, w2, topk_weights, topk_ids), config)


def setup_compile_process(kernel: str | None = None) -> None:
    """Once per compile process: one CPU thread for torch (the pool runs one process per core),
    and ``kernel``'s backend imported now (a server's package takes ~10 s), while the GPU workers
    start, rather than at the first job. A backend that does not import is left to the first
    job, which reports it ("not compiled ahead").

    The process lowers its CPU priority by ``COMPILE_NICENESS`` first: a node's compile processes
    outnumber its cores, and at full priority they starved the GPU workers' own start (on an H200
    host, 62 compile processes importing vLLM on 32 cores held a GPU worker's start to 48-54 s);
    with speculative jobs they are also busy most of a run. Compiles use the cores the workers and
    the driver leave idle."""
    try:
        os.nice(COMPILE_NICENESS)
    except OSError:  # a platform without nice: compile at normal priority
        pass
    import torch

    torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile-ahead needs the Triton compiler, not the interpreter (unset TRITON_INTERPRET)")
    if kernel is not None:
        from workers import backends

        try:
            backends.load(kernel)
        except Exception:  # noqa: BLE001 - the first job meets the same error and reports it
            pass


def compile_job(job: CompileJob) -> CompileOutcome:
    """Compile ``job`` in this process (see the module docstring); never raises for a bad config."""
    from workers import backends

    started = time.monotonic()
    shape, config = job.shape, job.config
    compiled: list = []
    try:
        try:
            backends.load(job.target.kernel).validate(config, shape)
        except ValueError as exc:
            raise ConfigRejected(str(exc)) from None
        _use_target(job.target)
        with _compile_instead_of_launch(compiled):
            for M in job.batch_sizes:
                _meta_runner(shape, M, config, job.target.kernel).run()
    except Exception as exc:  # noqa: BLE001 - classified below; unknown errors leave the decision to the GPU
        status, message = classify(exc), describe(exc)
        if status in COMPILE_VERDICTS:
            return CompileOutcome(status, message, len(compiled), time.monotonic() - started)
        return CompileOutcome(Status.OK, f"not compiled ahead ({message})", len(compiled), time.monotonic() - started)
    kernels = [k for k in compiled if k is not None]
    over = [k for k in kernels if k.metadata.shared > job.target.max_shared_mem]
    if over:
        need = max(k.metadata.shared for k in over)
        return CompileOutcome(Status.OUT_OF_RESOURCES,
                              f"OutOfResources: shared memory, required: {need}, hardware limit: "
                              f"{job.target.max_shared_mem}", len(kernels), time.monotonic() - started)
    return CompileOutcome(Status.OK, "", len(kernels), time.monotonic() - started)


class CompileService:
    """One node's compile-ahead processes, behind a Ray actor the driver pins to that node
    (``tuner.compiling``). The actor takes no GPU and no CPU from Ray's accounting; its
    ``CompilePool`` runs ``compiler.compile`` on ``processes`` spare cores (the driver sizes it: the
    node's CPUs minus one per GPU worker there), each process ``compiler.setup`` first. Being on
    the GPU worker's node is the point: the Triton cache the processes fill is the one that worker
    reads."""

    def __init__(self, processes: int, timeout_s: float, compiler: Compiler) -> None:
        self.pool = CompilePool(compiler.compile, processes, timeout_s, setup=compiler.setup)

    def size(self) -> int:
        return self.pool.size

    def submit(self, jobs: list[tuple[Hashable, CompileJob]], speculative: bool = False) -> None:
        """Queue ``jobs``; ``speculative`` ones only fill processes no needed job waits for."""
        for key, job in jobs:
            self.pool.submit(key, job, speculative)

    def promote(self, keys: list[Hashable]) -> None:
        """Speculative jobs now needed: they run before every speculative one still waiting."""
        for key in keys:
            self.pool.promote(key)

    def drop_waiting(self) -> list[Hashable]:
        """Drop the jobs no process has started; their keys (``CompilePool.drop_waiting``)."""
        return self.pool.drop_waiting()

    def collect(self, wait_s: float) -> list[tuple[Hashable, CompileOutcome]]:
        """Outcomes finished since the last call (waits up to ``wait_s`` for a first one)."""
        out = []
        for key, result, seconds in self.pool.results(wait_s):
            if isinstance(result, PoolFailure):
                result = CompileOutcome(result.status, result.message, 0, result.seconds)
            out.append((key, result))
        return out

    def close(self) -> None:
        self.pool.close()
