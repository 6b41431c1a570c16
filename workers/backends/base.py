"""The interface the BenchmarkWorker times: one ``KernelBackend`` per kernel implementation.

A backend turns (inputs, config) into a ``KernelRunner`` whose ``run()`` is one whole fused-MoE
call. The worker owns everything around it (correctness check against the fp32 reference,
timing, failure classification); strategies, engine and journal never see a backend, only the
strings of ``describe()``, which go into the worker environment and hence into every journal
key, the summary, the run log and the reports.

Contract of a runner (what CUDA-graph timing and compile-ahead rely on):
- every buffer is allocated when the runner is built; ``run()`` only launches work (no host
  synchronisation, no shape-dependent allocation), so it can be captured in a CUDA graph and
  replayed;
- ``output`` is the ``[M, K]`` result of the last ``run()`` in x's dtype (the tensor object may be
  the same for every call);
- ``run_up()`` / ``run_down()`` exist only when ``KernelBackend.splits`` is true (SGLang-style split
  tuning): the sort plus the up GEMM, and the down GEMM on the intermediate the last ``run()``
  left behind;
- built from inputs on torch's ``meta`` device (``MoEInputs`` with meta tensors) while
  ``workers.compile_ahead`` replaces each Triton launch by ``warmup``, ``run()`` compiles every
  kernel the GPU call would launch, with the same specialization, and launches nothing —
  only when ``KernelBackend.compiles_ahead`` is true.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol

import torch

from workers.quant import QuantizedWeight
from workers.records import Config, MoEShape
from workers.workspace import PRIVATE, Workspace

DESCRIBE_KEYS = ("kernel", "kernel_entry", "kernel_version", "kernel_hash")
"""What ``KernelBackend.describe`` returns: the backend name (``builtin``, ``vllm``, ``sglang``,
...), the entry point timed (a dotted function name, or for the builtin kernel its module), the
version of the code that provides it (e.g. ``vllm 0.33.0``), and a 16-hex-digit hash of the source
files whose change would change a timing."""


def describe_label(described: Mapping[str, str]) -> str:
    """``backend (entry point, version, source hash)``: the kernel behind a number, from a
    ``describe()`` (or a worker environment holding its ``DESCRIBE_KEYS``); ``?`` for a part not given."""
    kernel, entry, version, source = (described.get(key, "?") for key in DESCRIBE_KEYS)
    return f"{kernel} ({entry}, {version}, source {source})"


class BackendUnavailable(RuntimeError):
    """The requested backend's code cannot be imported here; the message names what is missing."""


class MoEInputs(Protocol):
    """What a runner reads (``workers.problem.Problem`` is one): ``x [M, K]`` in the activation
    dtype, ``w13 [E, 2N, K]`` (gate rows first) and ``w2 [E, K, N]`` in ``workers.quant``'s layouts,
    routing ``topk_weights`` fp32 / ``topk_ids`` int32 ``[M, topk]``."""

    shape: MoEShape
    x: torch.Tensor
    w13: QuantizedWeight
    w2: QuantizedWeight
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


class KernelRunner(Protocol):
    """One config bound to one set of inputs, every buffer allocated (see the module docstring)."""

    output: torch.Tensor

    def run(self) -> torch.Tensor:
        """One whole fused-MoE call; returns ``output``."""
        ...


class SplitRunner(KernelRunner, Protocol):
    def run_up(self) -> None: ...

    def run_down(self) -> None: ...


class KernelBackend(ABC):
    """One fused-MoE kernel implementation the worker can time."""

    name: str = ""
    splits: bool = False
    """Whether runners have ``run_up``/``run_down`` (GEMM-split tuning)."""
    compiles_ahead: bool = False
    """Whether runners built on meta tensors compile every kernel under ``workers.compile_ahead``."""
    activation: str = "silu"
    """The activation between the GEMMs of gated experts (``workers.reference.ACTIVATIONS``): the
    fp32 reference a runner is checked against must use the same one. Non-gated experts
    (``MoEShape.gated`` False) run relu² (``workers.reference.RELU2``), whatever the backend."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """``DESCRIBE_KEYS`` → values; stable for the life of the process."""

    @abstractmethod
    def check(self, shape: MoEShape) -> str | None:
        """None when this backend runs ``shape`` (dtype, block shape, ...), else why not (one line)."""

    def validate(self, config: Config, shape: MoEShape) -> None:
        """Raise ValueError when the kernel refuses ``config`` for ``shape`` before compiling
        (recorded as a compile error, never timed). Default: nothing is refused up front."""

    @abstractmethod
    def runner(self, inputs: MoEInputs, config: Config, down_config: Config | None = None, *,
               workspace: Workspace = PRIVATE) -> KernelRunner:
        """A runner of ``config`` (``down_config`` for the down GEMM, only where ``splits``) on ``inputs``,
        its buffers from ``workspace`` (``workers.workspace``: the worker shares one among the runners
        of a problem; default: the runner's own).

        Raises ValueError for a shape ``check`` refuses or a config ``validate`` refuses."""
