"""Kernel backends: which fused-MoE implementation the BenchmarkWorker times.

``load(name)`` returns the ``KernelBackend`` (``workers.backends.base``) for ``name``:
``builtin`` (moe-tune's kernel), ``vllm`` and ``sglang`` (each server's own Triton kernel run by
that server's own code of the version at hand; ``workers.backends.server_code`` finds it).
Further backends are added to ``_REGISTRY`` by name. The driver imports this package to list the
names and, before Ray starts, to probe whether a server's backend loads (``tuner.kernel_choice``).

This module owns the backend names and imports neither torch nor a backend: the driver reads the
names while it parses arguments, before torch is needed. The interface (``KernelBackend``,
``BackendUnavailable``, ...) is ``workers.backends.base``; ``load`` imports a backend's module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.backends.base import KernelBackend

BUILTIN = "builtin"
"""moe-tune's own kernel (``workers.fused_moe_kernel``)."""
VLLM = "vllm"
"""vLLM's fused-MoE Triton kernel, run by vLLM's code (named after its server, as ``SGLANG``)."""
SGLANG = "sglang"
"""SGLang's fused-MoE Triton kernel, run by SGLang's code."""
TRITON_KERNELS = "triton_kernels"
"""triton_kernels' ``matmul_ogs``, which the servers run for mxfp4 on some GPUs (takes no config)."""
_REGISTRY: dict[str, str] = {
    BUILTIN: "workers.backends.builtin:BuiltinBackend",
    VLLM: "workers.backends.vllm:VllmBackend",
    SGLANG: "workers.backends.sglang:SglangBackend",
    TRITON_KERNELS: "workers.backends.triton_kernels:TritonKernelsBackend",
}
NO_CONFIG: dict[str, str] = {
    TRITON_KERNELS: "triton_kernels' matmul_ogs takes no fused-MoE config (its launch choices are its own "
                    "heuristic's) and no server reads a config file for it",
}
"""Backends whose kernel takes no fused-MoE config, with why (one phrase): there is nothing to tune
or bench in them (``compare`` times them as the servers launch them)."""
_loaded: dict[str, KernelBackend] = {}


def names() -> tuple[str, ...]:
    """Every backend name."""
    return tuple(_REGISTRY)


def config_names() -> tuple[str, ...]:
    """The backends whose kernel takes a fused-MoE config (the ones ``tune`` and ``bench`` can time)."""
    return tuple(name for name in _REGISTRY if name not in NO_CONFIG)


def load(name: str) -> KernelBackend:
    """The backend ``name`` (one instance per process).

    Raises ValueError for an unknown name, ``workers.backends.base.BackendUnavailable`` when its
    code does not import here."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(_REGISTRY)}")
    if name not in _loaded:
        module_name, _, class_name = _REGISTRY[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module_name), class_name)()
    return _loaded[name]


__all__ = ["BUILTIN", "NO_CONFIG", "SGLANG", "TRITON_KERNELS", "VLLM", "config_names", "load", "names"]
