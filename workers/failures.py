"""What a failed candidate's exception means: the one place that turns a failure into a status,
for the GPU worker (``workers.worker``) and the compile-ahead processes (``workers.compile_ahead``).

- The kernel refusing a config before compiling (``ConfigRejected``) and Triton's compile errors
  (``CompilationError``, ``PTXASError``, the interpreter's ``InterpreterError``, and an MLIR pass
  of Triton's compiler failing, which it raises as a plain ``RuntimeError``: ``COMPILE_MARKERS``) →
  ``compile_error``; ``OutOfResources`` (shared memory, registers) → ``out_of_resources``.
- A CUDA error that poisons the context (illegal memory access, misaligned address, unspecified
  launch failure, …; matched on the message, as CUDA reports them as plain ``RuntimeError``s)
  → None: every later CUDA call in that process would fail too, so the process must end.
- Anything else → ``crashed``, except ``InputChanged`` (the run's input changed under it),
  which is nobody's status: it ends the run.

Compile-ahead settles a candidate without its GPU only on a ``COMPILE_VERDICTS`` status; any
other failure there says nothing about the config, and the GPU decides as it always did.
Imports only the standard library at module level (Triton is imported when classifying).
"""

from __future__ import annotations

from workers.records import Status

POISON_MARKERS = (
    "illegal memory access", "misaligned address", "unspecified launch failure", "illegal instruction",
    "device-side assert", "an illegal", "launch timed out", "hardware exception", "ECC error",
    "CUDA error: unknown error", "cudaErrorLaunchFailure",
)
COMPILE_MARKERS = ("PassManager::run failed",)
"""Messages of plain ``RuntimeError``s that Triton's compiler raises for a config it cannot lower
(Triton 3.6 on an H200, vLLM 0.33's fused-MoE kernel: BLOCK_SIZE_M 256, BLOCK_SIZE_N 128,
BLOCK_SIZE_K 128, 4 warps); the same config fails the same way on every try."""
COMPILE_VERDICTS = (Status.COMPILE_ERROR, Status.OUT_OF_RESOURCES, Status.TIMEOUT)
"""Compile-ahead outcomes that settle a candidate without the GPU (a hung compile would hang the
GPU worker too)."""
MESSAGE_LIMIT = 500


class InputChanged(Exception):
    """The run's input is no longer what the run was started with (a pinned routing file's
    content changed): no candidate's status. The worker lets it out of ``measure``, and the pool
    (``tuner.pool``) ends the run with its message instead of recording a measurement whose
    journal key would name the old input."""


def input_changed(exc: BaseException) -> str | None:
    """The message of an ``InputChanged`` (raised here, or in a Ray worker: a ``RayTaskError``
    carries it as ``cause``), or None for any other error."""
    error = getattr(exc, "cause", None) or exc
    return str(error) if isinstance(error, InputChanged) else None


class ConfigRejected(Exception):
    """The kernel refuses this config for this dtype before compiling (e.g. a tile across fp8 blocks)."""


def _compile_errors() -> tuple[type[BaseException], ...]:
    from triton.compiler import errors as compiler_errors
    from triton.runtime import errors as runtime_errors

    names = [(compiler_errors, "CompilationError"), (runtime_errors, "PTXASError"),
             (runtime_errors, "InterpreterError")]
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


def classify(exc: BaseException) -> Status | None:
    """The status a failed candidate gets, or None when the error poisoned the CUDA context."""
    from triton.runtime.errors import OutOfResources

    if isinstance(exc, OutOfResources):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, (ConfigRejected, *_compile_errors())):
        return Status.COMPILE_ERROR
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(marker in text for marker in COMPILE_MARKERS):
        return Status.COMPILE_ERROR
    if any(marker.lower() in text.lower() for marker in POISON_MARKERS):
        return None
    return Status.CRASHED


def describe(exc: BaseException) -> str:
    """The one line a measurement or compile outcome carries: ``Type: first line of the message``."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"[:MESSAGE_LIMIT]
