"""``--kernel vllm|sglang``: time the inference server's own fused-MoE entry point instead of ours.

Tuned files are only as good as their fit to the kernel that reads them; a server release may
change its kernel. With this adapter the worker calls the installed server's ``fused_experts``
with the candidate config forced through the server's public override mechanism, the
``override_config`` context manager that both servers' tuning scripts use: inside it the
server's config lookup returns the given dict instead of reading its JSON files.

Call forms supported (read from the signatures, so one adapter covers several releases):
- vLLM ``vllm.model_executor.layers.fused_moe``: ``fused_experts(x, w1, w2, topk_weights,
  topk_ids, inplace=False, quant_config=…)`` with the ``*_moe_quant_config`` builders of
  ``…fused_moe.config`` (recent releases), or the older ``use_fp8_w8a8=…, w1_scale=…`` keywords.
- SGLang: ``fused_experts(x, w1, w2, topk_output, moe_runner_config, use_fp8_w8a8=…, …)``
  (``sglang.srt.layers.moe.moe_runner.triton_utils``, recent) or ``fused_experts(x, w1, w2,
  topk_weights, topk_ids, inplace=False, use_fp8_w8a8=…, …)`` (``…moe.fused_moe_triton``, older).

The weights are ours (``workers.quant`` layouts match what both servers' Triton kernels read:
w13 ``[E, 2N, K]`` gate rows first, w2 ``[E, K, N]``, fp8 per-expert or block scales, int8
per-output-channel scales), so the result is checked against the same fp32 reference.
Imported only inside workers: the driver machine need not have vLLM or SGLang.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from workers.problem import Problem
from workers.records import Config, DType

SERVER_KERNELS = ("vllm", "sglang")
SUPPORTED_DTYPES = (DType.BF16, DType.FP16, DType.FP8_W8A8, DType.INT8_W8A16)


class ServerKernelUnavailable(RuntimeError):
    """The requested server package (or the entry point this adapter knows) is not importable here."""


def _import_first(kind: str, *names: str) -> Any:
    errors = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{name}: {exc}")
    raise ServerKernelUnavailable(f"--kernel {kind}: none of {', '.join(names)} is importable ({errors[-1]})")


def _source_hash(obj: Any) -> str:
    path = inspect.getsourcefile(obj)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else "unknown"


class ServerRunner:
    """One candidate config bound to one problem; ``run()`` is one MoE call, ``output`` its result."""

    def __init__(self, call: Any, override: Any, config: Config, problem: Problem) -> None:
        self._call = call
        self._override = override
        self._config = config.to_dict()
        self.output = torch.empty_like(problem.x)

    def run(self) -> None:
        with self._override(self._config):
            self.output = self._call()


class ServerKernel(ABC):
    """The adapter for one server; ``runner(problem, config)`` is what the BenchmarkWorker times."""

    name = ""

    def __init__(self, package: str, override: Any, fused_experts: Any) -> None:
        self.package = package
        self.override = override
        self.fused_experts = fused_experts
        self.parameters = inspect.signature(fused_experts).parameters

    def describe(self) -> dict[str, str]:
        version = getattr(importlib.import_module(self.package), "__version__", "unknown")
        return {"kernel_version": f"{self.package} {version}", "kernel_hash": _source_hash(self.fused_experts)}

    def runner(self, problem: Problem, config: Config) -> ServerRunner:
        dtype = problem.shape.dtype
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"--kernel {self.name} supports {', '.join(d.value for d in SUPPORTED_DTYPES)}, "
                             f"not {dtype.value}")
        args, kwargs = self.call_arguments(problem)
        return ServerRunner(lambda: self.fused_experts(*args, **kwargs), self.override, config, problem)

    @abstractmethod
    def call_arguments(self, problem: Problem) -> tuple[tuple, dict]:
        """Positional and keyword arguments of one ``fused_experts`` call on ``problem``."""

    @staticmethod
    def legacy_quant_keywords(problem: Problem) -> dict[str, Any]:
        """The ``use_*`` flag and scales of the keyword-style call both servers accept(ed)."""
        dtype, w13, w2 = problem.shape.dtype, problem.w13, problem.w2
        if dtype is DType.FP8_W8A8:
            block = list(problem.shape.block_shape) if problem.shape.block_shape else None
            return {"use_fp8_w8a8": True, "w1_scale": w13.scale, "w2_scale": w2.scale, "block_shape": block}
        if dtype is DType.INT8_W8A16:
            return {"use_int8_w8a16": True, "w1_scale": w13.scale, "w2_scale": w2.scale}
        return {}


class VllmKernel(ServerKernel):
    name = "vllm"

    def __init__(self) -> None:
        override = _import_first("vllm", "vllm.model_executor.layers.fused_moe.override_config")
        fused_experts = _import_first("vllm", "vllm.model_executor.layers.fused_moe.fused_moe.fused_experts")
        super().__init__("vllm", override, fused_experts)

    def call_arguments(self, problem: Problem) -> tuple[tuple, dict]:
        args = (problem.x, problem.w13.data, problem.w2.data, problem.topk_weights, problem.topk_ids)
        if "quant_config" not in self.parameters:
            return args, {"inplace": False, **self.legacy_quant_keywords(problem)}
        return args, {"inplace": False, "quant_config": self._quant_config(problem)}

    @staticmethod
    def _quant_config(problem: Problem) -> Any:
        dtype, w13, w2 = problem.shape.dtype, problem.w13, problem.w2
        if dtype is DType.FP8_W8A8:
            build = _import_first("vllm", "vllm.model_executor.layers.fused_moe.config.fp8_w8a8_moe_quant_config")
            block = list(problem.shape.block_shape) if problem.shape.block_shape else None
            return build(w1_scale=w13.scale, w2_scale=w2.scale, a1_scale=None, a2_scale=None, block_shape=block)
        if dtype is DType.INT8_W8A16:
            build = _import_first("vllm", "vllm.model_executor.layers.fused_moe.config.int8_w8a16_moe_quant_config")
            return build(w1_scale=w13.scale, w2_scale=w2.scale, w1_zp=None, w2_zp=None)
        return None


class SglangKernel(ServerKernel):
    name = "sglang"

    def __init__(self) -> None:
        override = _import_first("sglang", "sglang.srt.layers.moe.moe_runner.triton_utils.override_config",
                                 "sglang.srt.layers.moe.fused_moe_triton.override_config")
        fused_experts = _import_first("sglang", "sglang.srt.layers.moe.moe_runner.triton_utils.fused_experts",
                                      "sglang.srt.layers.moe.fused_moe_triton.fused_experts")
        super().__init__("sglang", override, fused_experts)

    def call_arguments(self, problem: Problem) -> tuple[tuple, dict]:
        quant = self.legacy_quant_keywords(problem)
        if "topk_output" not in self.parameters:
            args = (problem.x, problem.w13.data, problem.w2.data, problem.topk_weights, problem.topk_ids)
            return args, {"inplace": False, **quant}
        runner_config = _import_first("sglang", "sglang.srt.layers.moe.moe_runner.MoeRunnerConfig")(inplace=False)
        router_logits = torch.empty(problem.x.shape[0], problem.shape.E, device=problem.x.device)
        topk_output = (problem.topk_weights, problem.topk_ids, router_logits)
        return (problem.x, problem.w13.data, problem.w2.data, topk_output, runner_config), quant


_ADAPTERS = {"vllm": VllmKernel, "sglang": SglangKernel}


def load(kind: str) -> ServerKernel:
    """The adapter for ``kind`` ("vllm" or "sglang"); raises ServerKernelUnavailable if not importable."""
    if kind not in _ADAPTERS:
        raise ValueError(f"unknown server kernel {kind!r}; expected one of {SERVER_KERNELS}")
    return _ADAPTERS[kind]()
