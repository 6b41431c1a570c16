"""Kernel backends: which fused-MoE implementation the BenchmarkWorker times.

``load(name)`` returns the ``KernelBackend`` (``workers.backends.base``) for ``name``:
``builtin`` (moe-tune's kernel), ``vllm`` and ``sglang`` (each server's own Triton kernel run by
that server's own code of the version at hand; ``workers.backends.server_code`` finds it).
Further backends are added to ``_REGISTRY`` by name. The driver imports this package to list the
names and, before Ray starts, to probe whether a server's backend loads (``tuner.kernel_choice``).
"""

from __future__ import annotations

import importlib

from workers.backends.base import (DESCRIBE_KEYS, BackendUnavailable, KernelBackend, KernelRunner, MoEInputs,
                                   SplitRunner)

BUILTIN = "builtin"
_REGISTRY: dict[str, str] = {
    BUILTIN: "workers.backends.builtin:BuiltinBackend",
    "vllm": "workers.backends.vllm:VllmBackend",
    "sglang": "workers.backends.sglang:SglangBackend",
    "triton_kernels": "workers.backends.triton_kernels:TritonKernelsBackend",
}
NO_CONFIG: dict[str, str] = {
    "triton_kernels": "triton_kernels' matmul_ogs takes no fused-MoE config (its launch choices are its own "
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

    Raises ValueError for an unknown name, BackendUnavailable when its code does not import here."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(_REGISTRY)}")
    if name not in _loaded:
        module_name, _, class_name = _REGISTRY[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module_name), class_name)()
    return _loaded[name]


__all__ = ["BUILTIN", "DESCRIBE_KEYS", "NO_CONFIG", "BackendUnavailable", "KernelBackend", "KernelRunner",
           "MoEInputs", "SplitRunner", "config_names", "load", "names"]
