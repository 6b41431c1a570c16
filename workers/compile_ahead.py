"""Compile a candidate's kernels without its GPU, so the GPU worker finds them in Triton's cache.

On the GPU, compiling (an up and a down GEMM per config, ~1.4 s) costs more than timing. These
jobs run in CPU processes on the GPU's node (``workers.compile_service``) and leave their
binaries in the Triton cache on disk that the node's GPU worker reads (same user, same
``TRITON_CACHE_DIR``), where its first launch of that config finds them.

How, without a GPU and without model-size tensors:
- The problem is built on torch's ``meta`` device: real shapes, dtypes and strides, no memory.
  ``MoERunner`` is then driven exactly as the worker drives it, so every kernel (sort, GEMMs,
  SwiGLU, fp8 quantization) is specialized from the very arguments the GPU will pass; meta
  tensors report their view offsets as pointers, so pointer alignment specializes alike too.
- Each ``kernel[grid](...)`` launch becomes ``kernel.warmup(...)``: Triton computes the
  specialization and compiles, and launches nothing.
- Triton asks its active driver for the device and target before compiling; in a process that
  sees no GPU (Ray hides GPUs from CPU tasks) a stand-in driver answers with the GPU worker's
  own target (backend, arch, warp size), which with the same Triton, source, options and
  environment gives the same cache key the worker computes.

Verdicts: a config the kernel rejects, a compile error or a kernel needing more shared memory
than the worker's GPU has (``CompiledKernel.metadata.shared``, the check Triton itself makes when
loading) are final, so the GPU never sees them. Anything else that goes wrong here is not a
verdict on the config: the candidate goes to the GPU, which decides as it always did.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from workers.records import Config, MoEShape, Status

VERDICTS = (Status.COMPILE_ERROR, Status.OUT_OF_RESOURCES, Status.TIMEOUT)
"""Outcomes that settle a candidate without the GPU (a hung compile would hang the GPU worker too)."""


@dataclass(frozen=True)
class CompileTarget:
    """The GPU a compile is for, as its worker reports it (``BenchmarkWorker.compile_target``)."""

    backend: str
    arch: int
    warp_size: int
    max_shared_mem: int


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
        return self.status in VERDICTS


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


def _meta_runner(shape: MoEShape, M: int, config: Config):
    """A ``MoERunner`` for ``shape`` at batch size ``M`` whose tensors all live on ``meta``."""
    import torch

    from workers.moe import MoERunner
    from workers.quant import activation_dtype, quantize_weight

    act = activation_dtype(shape.dtype)
    w13 = quantize_weight(torch.empty((shape.E, 2 * shape.N, shape.K), dtype=act, device="meta"), shape.dtype,
                          shape.block_shape)
    w2 = quantize_weight(torch.empty((shape.E, shape.K, shape.N), dtype=act, device="meta"), shape.dtype,
                         shape.block_shape)
    x = torch.empty((M, shape.K), dtype=act, device="meta")
    topk_weights = torch.empty((M, shape.topk), dtype=torch.float32, device="meta")
    topk_ids = torch.empty((M, shape.topk), dtype=torch.int32, device="meta")
    return MoERunner(x, w13, w2, topk_weights, topk_ids, config)


def setup_compile_process() -> None:
    """Once per compile process: one CPU thread for torch (the pool runs one process per core)."""
    import torch

    torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile-ahead needs the Triton compiler, not the interpreter (unset TRITON_INTERPRET)")


def compile_job(job: CompileJob) -> CompileOutcome:
    """Compile ``job`` in this process (see the module docstring); never raises for a bad config."""
    from workers.fused_moe_kernel import validate_config
    from workers.worker import classify

    started = time.monotonic()
    shape, config = job.shape, job.config
    try:
        validate_config(config, shape.dtype, shape.block_shape)
    except ValueError as exc:
        return CompileOutcome(Status.COMPILE_ERROR, f"ConfigRejected: {exc}", 0, time.monotonic() - started)
    compiled: list = []
    try:
        _use_target(job.target)
        with _compile_instead_of_launch(compiled):
            for M in job.batch_sizes:
                _meta_runner(shape, M, config).run()
    except Exception as exc:  # noqa: BLE001 - classified below; unknown errors leave the decision to the GPU
        status = classify(exc)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        message = f"{type(exc).__name__}: {first_line}"[:500]
        if status in (Status.COMPILE_ERROR, Status.OUT_OF_RESOURCES):
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
