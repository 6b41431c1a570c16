"""``vllm``: vLLM's fused-MoE Triton kernel, run by vLLM's own code of the version at hand.

Entry points (``describe()["kernel_entry"]`` says which one a run used):
- ``fused_experts`` — the whole package imports and its compiled extension (``vllm._C``) loads:
  ``vllm.model_executor.layers.fused_moe.fused_moe.fused_experts`` under the package's
  ``override_config``
  (``workers.backends.server.ServerCallRunner``). Call forms: ``quant_config=`` built with
  ``…fused_moe.config.*_moe_quant_config`` (recent releases) or the older ``use_fp8_w8a8=…,
  w1_scale=…`` keywords, read from the signature.
- the launcher — only the Python files import (the compiled ops do not load under this torch):
  ``…fused_moe.fused_moe.invoke_fused_moe_triton_kernel`` (vLLM ≥ 0.3x; ``invoke_fused_moe_kernel``
  in older releases), with ``workers.backends.server.LauncherRunner`` around it. vLLM's
  ``_prepare_expert_assignment`` (when the version has it) decides, as in vLLM, whether a batch
  skips the token sort (few tokens for many experts: one block per (token, expert) pair).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from workers.backends import VLLM, server_code
from workers.backends.base import BackendUnavailable, MoEInputs
from workers.backends.server import (ENTRY_FUSED_EXPERTS, ENTRY_LAUNCHER, LauncherRunner, ServerBackend, block_list,
                                     compiled_ops_load, keyword_quant_arguments, shape_refusal)
from workers.records import Config, DType, MoEShape
from workers.workspace import Workspace

PACKAGE = "vllm.model_executor.layers.fused_moe"
MODULE = PACKAGE + ".fused_moe"
LAUNCHERS = ("invoke_fused_moe_triton_kernel", "invoke_fused_moe_kernel")


class VllmBackend(ServerBackend):
    name = VLLM

    def _import(self) -> tuple[str, Any, Any, Any, Any]:
        failure: str | None = None
        try:
            package = server_code.import_module(PACKAGE, bare_parents=False)
            module = server_code.import_module(MODULE, bare_parents=False)
            if not compiled_ops_load("vllm._C"):
                failure = "vllm._C does not load"
            elif hasattr(package, "override_config") and hasattr(module, "fused_experts"):
                return ENTRY_FUSED_EXPERTS, module, module.fused_experts, package.override_config, None
        except server_code.ImportFailed as exc:
            failure = str(exc)
        try:
            module = server_code.import_module(MODULE)
        except server_code.ImportFailed as exc:
            hint = f"; install {exc.missing!r}" if exc.missing else ""
            raise BackendUnavailable(f"--kernel vllm: cannot import vLLM's fused-MoE code: {exc}{hint}") from exc
        launch = next((getattr(module, name) for name in LAUNCHERS if hasattr(module, name)), None)
        if launch is None:
            raise BackendUnavailable(f"--kernel vllm: {MODULE} has none of {', '.join(LAUNCHERS)} "
                                     f"(package import: {failure or 'compiled ops do not load'})")
        kernel = getattr(module, "fused_moe_kernel", None)
        if kernel is not None and not hasattr(kernel, "__getitem__"):
            # vllm.triton_utils hands out a placeholder `triton.jit` (a plain function) when it does not
            # find exactly one active Triton GPU driver (HAS_TRITON false), e.g. on a CPU host
            raise BackendUnavailable("--kernel vllm: vLLM disabled Triton here (vllm.triton_utils.HAS_TRITON is "
                                     "False: no single active Triton GPU driver), so its kernel cannot run")
        return ENTRY_LAUNCHER, module, None, None, launch

    def check(self, shape: MoEShape) -> str | None:
        return shape_refusal(self.name, "vLLM", shape)

    def _launcher_runner(self, inputs: MoEInputs, config: Config, workspace: Workspace) -> LauncherRunner:
        return LauncherRunner(self._launch, inputs, config, quantizes_input=False, assignment=self._assignment,
                              workspace=workspace)

    # -- launcher entry ------------------------------------------------------------------------

    def _assignment(self, topk_ids: torch.Tensor, config: dict, num_experts: int) -> tuple | None:
        """vLLM's own choice between sorting tokens and its unsorted small-batch path: its
        ``_prepare_expert_assignment`` is called with the sort replaced by a marker (the sort
        itself is a compiled op here); the marker coming back means "sort"."""
        prepare = getattr(self.module, "_prepare_expert_assignment", None)
        if prepare is None:
            return None
        marker = object()
        original = getattr(self.module, "moe_align_block_size", None)
        self.module.moe_align_block_size = lambda *args, **kwargs: marker
        try:
            offered = {"topk_ids": topk_ids, "config": config, "num_tokens": topk_ids.shape[0],
                       "top_k_num": topk_ids.shape[1], "global_num_experts": num_experts, "expert_map": None,
                       "ignore_invalid_experts": True, "weights_host_resident": False}
            parameters = inspect.signature(prepare).parameters
            result = prepare(**{k: v for k, v in offered.items() if k in parameters})
        finally:
            self.module.moe_align_block_size = original
        return None if result is marker else tuple(result)

    # -- fused_experts entry -------------------------------------------------------------------

    def _call_arguments(self, inputs: MoEInputs) -> tuple[tuple, dict]:
        args = (inputs.x, inputs.w13.data, inputs.w2.data, inputs.topk_weights, inputs.topk_ids)
        if "quant_config" not in inspect.signature(self._fused_experts).parameters:
            return args, {"inplace": False, **keyword_quant_arguments(inputs)}
        return args, {"inplace": False, "quant_config": _quant_config(inputs)}


def _quant_config(inputs: MoEInputs) -> Any:
    dtype = inputs.shape.dtype
    config = importlib.import_module(PACKAGE + ".config")
    if dtype is DType.FP8_W8A8:
        return config.fp8_w8a8_moe_quant_config(w1_scale=inputs.w13.scale, w2_scale=inputs.w2.scale,
                                                a1_scale=None, a2_scale=None, block_shape=block_list(inputs))
    if dtype is DType.INT8_W8A16:
        return config.int8_w8a16_moe_quant_config(w1_scale=inputs.w13.scale, w2_scale=inputs.w2.scale,
                                                  w1_zp=None, w2_zp=None)
    return None
