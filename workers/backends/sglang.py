"""``sglang``: SGLang's fused-MoE Triton kernel, run by SGLang's own code of the version at hand.

Entry points (``describe()["kernel_entry"]``):
- ``fused_experts`` — the package and its compiled kernels (``sgl_kernel``) import: SGLang's
  ``fused_experts`` under ``override_config``. Call forms, read from the signature:
  ``fused_experts(x, w1, w2, topk_output, moe_runner_config, use_fp8_w8a8=…, …)``
  (``sglang.srt.layers.moe.moe_runner.triton_utils``, recent) or ``fused_experts(x, w1, w2,
  topk_weights, topk_ids, inplace=False, use_fp8_w8a8=…, …)`` (``…moe.fused_moe_triton``, older).
- the launcher — only the Python files import: ``…fused_moe_triton.fused_moe_triton_kernels.
  invoke_fused_moe_kernel`` with ``workers.backends.server.LauncherRunner`` around it. SGLang's
  launcher quantizes fp8 activations itself with ``sgl_kernel`` ops on CUDA, so fp8_w8a8 needs
  ``sgl_kernel`` there; bf16, fp16 and int8_w8a16 do not. On CUDA, SGLang's quantization modules
  (``fp8_kernel``, ``int8_kernel``: imported by the launcher's module) import ``sgl_kernel``'s ops
  at module level; where ``sgl_kernel`` does not load, ``import_code`` imports them against
  ``AbsentCompiledOps``, whose every op raises when called (the launches timed here call none).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch

from workers.backends import SGLANG, server_code
from workers.backends.base import BackendUnavailable, MoEInputs
from workers.backends.server import (ENTRY_FUSED_EXPERTS, ENTRY_LAUNCHER, LauncherRunner, ServerBackend,
                                     compiled_ops_load, keyword_quant_arguments, shape_refusal)
from workers.records import Config, DType, MoEShape
from workers.workspace import Workspace

CALL_MODULES = ("sglang.srt.layers.moe.moe_runner.triton_utils", "sglang.srt.layers.moe.fused_moe_triton")
LAUNCHER_MODULE = "sglang.srt.layers.moe.fused_moe_triton.fused_moe_triton_kernels"
LAUNCHER = "invoke_fused_moe_kernel"
SERVER_ARGS_MODULE = "sglang.srt.server_args"
COMPILED_OPS = "sgl_kernel"


class AbsentCompiledOps(types.ModuleType):
    """What ``import sgl_kernel`` finds while SGLang's Python code is imported on a host where
    ``sgl_kernel`` does not load (its wheel is built for another torch): every name is a function
    that raises RuntimeError naming the op when called, so SGLang's module-level ``from sgl_kernel
    import …`` succeeds and any use of a compiled op fails loudly."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def absent(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{COMPILED_OPS}.{name}: SGLang's compiled ops do not load on this host")

        absent.__name__ = absent.__qualname__ = name
        return absent


@contextlib.contextmanager
def _absent_compiled_ops() -> Iterator[None]:
    """``AbsentCompiledOps`` as ``sgl_kernel`` for the duration (only where none is imported);
    removed after, so nothing later takes it for the compiled ops."""
    if COMPILED_OPS in sys.modules:
        yield
        return
    sys.modules[COMPILED_OPS] = AbsentCompiledOps(COMPILED_OPS)
    try:
        yield
    finally:
        if isinstance(sys.modules.get(COMPILED_OPS), AbsentCompiledOps):
            del sys.modules[COMPILED_OPS]


def import_code(module: str) -> types.ModuleType:
    """``server_code.import_module(module)`` for a module of SGLang's Python code (the launcher's,
    the default-config one): with ``AbsentCompiledOps`` standing for ``sgl_kernel`` where that
    does not load. Raises ``server_code.ImportFailed``."""
    if compiled_ops_load(COMPILED_OPS):
        return server_code.import_module(module)
    with _absent_compiled_ops():
        return server_code.import_module(module)


def ensure_server_args() -> None:
    """Give SGLang's kernel code the server arguments it reads, where none are set.

    SGLang 0.5.x's fused-MoE code reads the running server's arguments (``get_global_server_args()``:
    ``enable_deterministic_inference`` in ``get_default_config``, ``enable_fused_moe_sum_all_reduce``
    in ``fused_experts``), which raises ValueError outside a server. Outside one this sets SGLang's
    defaults, ``ServerArgs(model_path="dummy")`` (a model path SGLang's ``__post_init__`` skips its
    model and device checks for) through ``set_global_server_args_for_scheduler``, as SGLang's own
    kernel tests do. Arguments already set (inside a server) are kept; a release
    without the mechanism, or whose ``ServerArgs`` cannot be built here, is left as it is."""
    try:
        module = import_code(SERVER_ARGS_MODULE)
    except server_code.ImportFailed:
        return
    get = getattr(module, "get_global_server_args", None)
    put = getattr(module, "set_global_server_args_for_scheduler", None)
    if get is None or put is None:
        return
    try:
        get()
        return
    except ValueError:
        pass
    try:
        put(module.ServerArgs(model_path="dummy"))
    except Exception:  # noqa: BLE001 - a release whose ServerArgs validates more than this host offers
        pass


class SglangBackend(ServerBackend):
    name = SGLANG

    def __init__(self) -> None:
        self._ops = compiled_ops_load(COMPILED_OPS)
        super().__init__()

    def _import(self) -> tuple[str, Any, Any, Any, Any]:
        failure = "sgl_kernel does not import"
        if self._ops:
            for name in CALL_MODULES:
                try:
                    module = server_code.import_module(name, bare_parents=False)
                except server_code.ImportFailed as exc:
                    failure = str(exc)
                    continue
                if hasattr(module, "override_config") and hasattr(module, "fused_experts"):
                    ensure_server_args()
                    return ENTRY_FUSED_EXPERTS, module, module.fused_experts, module.override_config, None
        try:
            module = import_code(LAUNCHER_MODULE)
        except server_code.ImportFailed as exc:
            hint = f"; install {exc.missing!r}" if exc.missing else ""
            raise BackendUnavailable(f"--kernel sglang: cannot import SGLang's fused-MoE code: {exc}{hint} "
                                     f"(package entry: {failure})") from exc
        if not hasattr(module, LAUNCHER):
            raise BackendUnavailable(f"--kernel sglang: {LAUNCHER_MODULE} has no {LAUNCHER} (package entry: {failure})")
        ensure_server_args()
        return ENTRY_LAUNCHER, module, None, None, getattr(module, LAUNCHER)

    def check(self, shape: MoEShape) -> str | None:
        refusal = shape_refusal(self.name, "SGLang", shape)
        if refusal:
            return refusal
        if self.entry == ENTRY_LAUNCHER and shape.dtype is DType.FP8_W8A8 and not self._ops:
            return "SGLang's launcher quantizes fp8 activations with sgl_kernel, which does not import here"
        return None

    def _launcher_runner(self, inputs: MoEInputs, config: Config, workspace: Workspace) -> LauncherRunner:
        return LauncherRunner(self._launch, inputs, config, quantizes_input=True, workspace=workspace)

    def _call_arguments(self, inputs: MoEInputs) -> tuple[tuple, dict]:
        quant = keyword_quant_arguments(inputs)
        if "topk_output" not in inspect.signature(self._fused_experts).parameters:
            args = (inputs.x, inputs.w13.data, inputs.w2.data, inputs.topk_weights, inputs.topk_ids)
            return args, {"inplace": False, **quant}
        runner_class = server_code.import_module("sglang.srt.layers.moe.moe_runner", bare_parents=False).MoeRunnerConfig
        # all experts local, as a server without expert parallelism sets them (SGLang 0.5.x then
        # launches with filter_expert=False); releases without these fields take inplace only
        fields = inspect.signature(runner_class).parameters
        experts = {name: inputs.shape.E for name in ("num_experts", "num_local_experts") if name in fields}
        runner_config = runner_class(inplace=False, **experts)
        router_logits = torch.empty(inputs.x.shape[0], inputs.shape.E, device=inputs.x.device)
        topk_output = (inputs.topk_weights, inputs.topk_ids, router_logits)
        return (inputs.x, inputs.w13.data, inputs.w2.data, topk_output, runner_config), quant
