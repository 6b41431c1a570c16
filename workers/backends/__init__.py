"""Kernel backends: which fused-MoE implementation the BenchmarkWorker times.

``load(name)`` returns the ``KernelBackend`` (``workers.backends.base``) for ``name``:
``builtin`` (moe-tune's kernel), ``vllm`` and ``sglang`` (each server's own Triton kernel run by
that server's own code of the version at hand; ``workers.backends.server_code`` finds it).
Further backends register here by name. Imported inside workers (and compile processes): the
driver only needs ``names()`` and ``workers.backends.server_code.probe``.
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
}
SERVER_BACKENDS = ("vllm", "sglang")
"""Backends that are an inference server's own kernel (``--kernel auto`` picks among these)."""

_loaded: dict[str, KernelBackend] = {}


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def register(name: str, target: str) -> None:
    """Add a backend: ``target`` is ``"module:Class"``, imported on first ``load(name)``."""
    _REGISTRY[name] = target


def load(name: str) -> KernelBackend:
    """The backend ``name`` (one instance per process).

    Raises ValueError for an unknown name, BackendUnavailable when its code does not import here."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(_REGISTRY)}")
    if name not in _loaded:
        module_name, _, class_name = _REGISTRY[name].partition(":")
        _loaded[name] = getattr(importlib.import_module(module_name), class_name)()
    return _loaded[name]


__all__ = ["BUILTIN", "DESCRIBE_KEYS", "SERVER_BACKENDS", "BackendUnavailable", "KernelBackend", "KernelRunner",
           "MoEInputs", "SplitRunner", "load", "names", "register"]
