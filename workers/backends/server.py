"""What the ``vllm`` and ``sglang`` backends share: two ways to run a server's fused-MoE kernel.

- ``ServerCallRunner`` — the whole package imports (its compiled ops load): the server's public
  ``fused_experts`` with the candidate forced through its ``override_config`` context manager,
  the mechanism both servers' own tuning scripts use (inside it the config lookup returns the
  given dict instead of reading JSON files).
- ``LauncherRunner`` — only the server's Python code imports (e.g. a GPU host whose torch does not
  match the server's wheel, so its compiled ops do not load): the server's own Python launcher of
  its Triton kernel, the function its ``fused_experts`` calls once per GEMM, so the launch grid,
  the EM clamp, swap-AB / tensor-descriptor choices and the kernel are the server's code. Between
  the two GEMMs moe-tune supplies what the server would take from its compiled ops: the token
  sort (``workers.align``), SwiGLU (``workers.activation``), fp8 activation quantization where the
  launcher expects it done (``workers.fp8_activation``) and the top-k sum.

``ServerBackend`` is the backend both build on: which entry point was imported, what
``describe`` names, and which runner a candidate gets.

The weights are moe-tune's (``workers.quant`` layouts are what both servers' kernels read: w13
``[E, 2N, K]`` gate rows first, w2 ``[E, K, N]``, fp8 per-expert ``[E]`` or block
``[E, ⌈R/bn⌉, ⌈C/bk⌉]`` scales, int8 per-channel ``[E, R]``), so results are checked against
the same fp32 reference as the builtin kernel's.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from workers.activation import swiglu, swiglu_fp8_groups
from workers.align import TokenAligner
from workers.backends import server_code
from workers.backends.base import KernelBackend, KernelRunner, MoEInputs
from workers.fp8_activation import fp8_absmax, fp8_quantize_per_group, fp8_quantize_per_tensor, fp8_scale_shape
from workers.quant import FP8_DTYPE
from workers.records import Config, DType, MoEShape
from workers.workspace import PRIVATE, Workspace

SERVER_DTYPES = (DType.BF16, DType.FP16, DType.FP8_W8A8, DType.INT8_W8A16)
ENTRY_FUSED_EXPERTS = "fused_experts"
"""Entry point: the package's public ``fused_experts`` under its ``override_config``."""
ENTRY_LAUNCHER = "launcher"
"""Entry point: the server's own per-GEMM launcher of its Triton kernel (compiled ops absent)."""


_FAILED_LOADS: set[tuple[str, str]] = set()
"""(module, where its top-level package was found) of compiled extensions whose import failed in
this process."""


def compiled_ops_load(module: str) -> bool:
    """Whether the server's compiled extension ``module`` (``vllm._C``, ``sgl_kernel``) imports here
    (looked for in ``MOE_TUNE_SERVER_CODE`` first, as the server's Python code is).

    A backend's start asks several times (its own check, then each import of the server's code);
    an extension that is there but fails (a wheel built for another torch: loading its shared
    library fails) is imported once per place its package is found, not at every ask: the answer
    is remembered per (module, location), so another server tree (``MOE_TUNE_SERVER_CODE``,
    ``sys.path``) is asked afresh."""
    try:
        server_code.use_server_code_dir()
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):  # no server-code folder; a module registered without a spec
        return False
    if spec is None:
        return False
    where = (module, spec.origin or ":".join(spec.submodule_search_locations or ()))
    if where in _FAILED_LOADS:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a wheel built for another torch fails with any of several errors
        _FAILED_LOADS.add(where)
        return False
    return True


def shape_refusal(name: str, server: str, shape: MoEShape) -> str | None:
    """Why server backend ``name`` (``server``: the server's display name) cannot time ``shape``
    (None when it can): a dtype outside ``SERVER_DTYPES``, a block-quantized weight-only dtype (the
    server's GPTQ/AWQ kernel runs it), or a layout the call cannot pass (``layout_refusal``)."""
    if shape.dtype not in SERVER_DTYPES:
        return f"--kernel {name} runs {', '.join(d.value for d in SERVER_DTYPES)}, not {shape.dtype.value}"
    if shape.block_shape is not None and shape.dtype is not DType.FP8_W8A8:
        return f"block-quantized {shape.dtype.value} runs {server}'s GPTQ/AWQ kernel, not the one tuned here"
    return layout_refusal(name, shape)


def keyword_quant_arguments(inputs: MoEInputs) -> dict[str, Any]:
    """The ``use_*`` flag and scales of the keyword-style ``fused_experts`` call both servers accept(ed)."""
    dtype = inputs.shape.dtype
    if dtype is DType.FP8_W8A8:
        return {"use_fp8_w8a8": True, "w1_scale": inputs.w13.scale, "w2_scale": inputs.w2.scale,
                "block_shape": block_list(inputs)}
    if dtype is DType.INT8_W8A16:
        return {"use_int8_w8a16": True, "w1_scale": inputs.w13.scale, "w2_scale": inputs.w2.scale}
    return {}


def layout_refusal(name: str, shape: MoEShape) -> str | None:
    """Why backend ``name`` cannot time ``shape``'s layout (None when it can): the server call made
    here passes no expert map (expert parallelism), no activation choice (non-gated experts) and
    no per-channel fp8 scales. SGLang's fused shared experts are plain experts to the kernel."""
    layouts = [field for field in shape.layout_fields() if field != "fused_shared"]
    if not layouts:
        return None
    return (f"--kernel {name}: the server-kernel call passes no expert map, no activation choice and no "
            f"per-channel scales, so it cannot time {' or '.join(layouts)} layouts; use --kernel builtin")


def quant_flags(dtype: DType) -> dict[str, bool]:
    """The ``use_*`` flags both servers' launchers and legacy ``fused_experts`` take."""
    return {"use_fp8_w8a8": dtype is DType.FP8_W8A8, "use_int8_w8a8": False,
            "use_int8_w8a16": dtype is DType.INT8_W8A16, "use_int4_w4a16": False}


def block_list(inputs: MoEInputs) -> list[int] | None:
    return list(inputs.shape.block_shape) if inputs.shape.block_shape else None


def compute_type(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


class ServerCallRunner:
    """The server's ``fused_experts(*args, **kwargs)`` under ``override(config)``; ``output`` is its result."""

    def __init__(self, call: Callable[[], torch.Tensor], override: Any, config: Config, inputs: MoEInputs) -> None:
        self._call = call
        self._override = override
        self._config = config.to_dict()
        self.output = torch.empty_like(inputs.x)

    def run(self) -> torch.Tensor:
        with self._override(self._config):
            self.output = self._call()
        return self.output


def filter_arguments(function: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``offered`` that ``function`` accepts; raises TypeError naming a required
    parameter it does not offer (a launcher signature this adapter does not know)."""
    parameters = inspect.signature(function).parameters
    missing = [name for name, p in parameters.items()
               if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD and name not in offered]
    if missing:
        raise TypeError(f"{function.__module__}.{function.__qualname__} needs {', '.join(missing)}, "
                        "which this moe-tune version does not know how to supply")
    return {name: value for name, value in offered.items() if name in parameters}


class LauncherRunner:
    """The whole MoE call around a server's per-GEMM launcher (see the module docstring).

    ``launch`` is the server's launcher; ``quantizes_input`` says whether it quantizes fp8
    activations itself (SGLang's does; vLLM's expects them quantized). ``assignment``, when given,
    maps (topk_ids, config dict, number of experts) to the server's own expert-assignment choice: None when the
    server sorts tokens, else the (sorted_token_ids, expert_ids, num_tokens_post_padded) it passes
    instead (vLLM's unsorted small-batch path). Every buffer moe-tune owns comes from ``workspace``
    (``workers.workspace``; default: the runner's own).
    """

    def __init__(self, launch: Callable, inputs: MoEInputs, config: Config, *, quantizes_input: bool,
                 assignment: Callable[[torch.Tensor, dict, int], tuple | None] | None = None,
                 workspace: Workspace = PRIVATE) -> None:
        x, w13, w2 = inputs.x, inputs.w13, inputs.w2
        M, K = x.shape
        E, two_n, _ = w13.shape
        N = two_n // 2
        self._launch = launch
        self._config = config.to_dict()
        self._dtype = inputs.shape.dtype
        self._block = block_list(inputs)
        self._group_k = self._block[1] if self._block and self._dtype is DType.FP8_W8A8 else None
        self._fp8 = self._dtype is DType.FP8_W8A8
        self._quantizes_input = quantizes_input
        self.x, self.w13, self.w2 = x.contiguous(), w13, w2
        self.topk_ids = inputs.topk_ids.to(torch.int32).contiguous()
        self.topk_weights = inputs.topk_weights.contiguous()
        self.topk = self.topk_ids.shape[1]
        pairs = M * self.topk
        device = x.device
        self._fixed = assignment(self.topk_ids, dict(self._config), E) if assignment else None
        self._sort = None if self._fixed else TokenAligner(pairs, E, config.BLOCK_SIZE_M, device, workspace)
        empty = workspace.empty
        self._up = empty("up", (M, self.topk, 2 * N), x.dtype, device)
        self._activated = empty("activated", (pairs, N), x.dtype, device)
        self._down = empty("down", (M, self.topk, K), x.dtype, device)
        self.output = empty("output", (M, K), x.dtype, device)
        self._compute_type = compute_type(x.dtype)
        if self._fp8 and not quantizes_input:
            self._x_fp8 = empty("x_fp8", (M, K), FP8_DTYPE, device)
            self._act_fp8 = empty("activated_fp8", (pairs, N), FP8_DTYPE, device)
            self._x_scale = empty("x_scale", fp8_scale_shape(M, K, self._group_k), torch.float32, device)
            self._act_scale = empty("activated_scale", fp8_scale_shape(pairs, N, self._group_k), torch.float32, device)
            self._amax = empty("amax", (2,), torch.float32, device)

    def _quantize(self, a: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor) -> None:
        if self._group_k:
            fp8_quantize_per_group(a, out, scale, self._group_k)
        else:
            amax.zero_()
            fp8_absmax(a, amax)
            fp8_quantize_per_tensor(a, amax, out, scale)

    def _gemm(self, a: torch.Tensor, a_scale: torch.Tensor | None, b, c: torch.Tensor, assignment: tuple,
              mul_routed_weight: bool, top_k: int) -> None:
        sorted_token_ids, expert_ids, num_tokens_post_padded = assignment
        offered = {"A": a, "B": b.data, "C": c, "A_scale": a_scale, "B_scale": b.scale, "B_zp": None,
                   "B_bias": None, "bias": None, "topk_weights": self.topk_weights, "topk_ids": self.topk_ids,
                   "sorted_token_ids": sorted_token_ids, "expert_ids": expert_ids,
                   "num_tokens_post_padded": num_tokens_post_padded, "mul_routed_weight": mul_routed_weight,
                   "top_k": top_k, "config": dict(self._config), "compute_type": self._compute_type,
                   "per_channel_quant": False, "block_shape": self._block, **quant_flags(self._dtype),
                   # every expert is local (no expert map): SGLang's fused_experts then launches with
                   # filter_expert=False (0.5.x); its launcher's default is True
                   "filter_expert": False}
        self._launch(**filter_arguments(self._launch, offered))

    def run(self) -> torch.Tensor:
        """One whole MoE call; returns ``output``."""
        if self._fixed:
            assignment = self._fixed
        else:
            aligned = self._sort.run(self.topk_ids)
            assignment = (aligned.sorted_token_ids, aligned.expert_ids, aligned.num_tokens_post_padded)
        a, a_scale = self.x, None
        if self._fp8 and not self._quantizes_input:
            self._quantize(self.x, self._x_fp8, self._x_scale, self._amax[:1])
            a, a_scale = self._x_fp8, self._x_scale
        self._gemm(a, a_scale, self.w13, self._up, assignment, False, self.topk)
        gate_up = self._up.view(-1, self._up.shape[-1])
        if self._group_k and not self._quantizes_input:
            swiglu_fp8_groups(gate_up, self._act_fp8, self._act_scale, self._group_k, self.x.dtype)
            a, a_scale = self._act_fp8, self._act_scale
        else:
            swiglu(gate_up, self._activated)
            a, a_scale = self._activated, None
            if self._fp8 and not self._quantizes_input:
                self._quantize(self._activated, self._act_fp8, self._act_scale, self._amax[1:])
                a, a_scale = self._act_fp8, self._act_scale
        self._gemm(a, a_scale, self.w2, self._down, assignment, True, 1)
        torch.sum(self._down, dim=1, out=self.output)
        return self.output


class ServerBackend(KernelBackend):
    """A server's fused-MoE kernel through one of the two entry points (module docstring).

    Subclasses import the server's code (``_import``: the entry point, the module whose source is
    hashed, ``fused_experts``, ``override_config`` and the launcher, the last three None where the
    entry does not use them), build the ``fused_experts`` call (``_call_arguments``) and the
    launcher's runner (``_launcher_runner``)."""

    def __init__(self) -> None:
        self.entry, self.module, self._fused_experts, self._override, self._launch = self._import()
        self.compiles_ahead = self.entry == ENTRY_LAUNCHER

    @abstractmethod
    def _import(self) -> tuple[str, Any, Any, Any, Any]:
        """``(entry, module, fused_experts, override_config, launcher)``; BackendUnavailable if neither imports."""

    @abstractmethod
    def _call_arguments(self, inputs: MoEInputs) -> tuple[tuple, dict]:
        """Positional and keyword arguments of the server's ``fused_experts`` for ``inputs``."""

    @abstractmethod
    def _launcher_runner(self, inputs: MoEInputs, config: Config, workspace: Workspace) -> LauncherRunner:
        """The runner around the server's launcher, with its own choices (input quantization, sort)."""

    def describe(self) -> dict[str, str]:
        name = self.module.__name__
        entry = (f"{name}.fused_experts+override_config" if self.entry == ENTRY_FUSED_EXPERTS
                 else f"{name}.{self._launch.__name__}")
        return {"kernel": self.name, "kernel_entry": entry,
                "kernel_version": f"{self.name} {server_code.version(self.name)}",
                "kernel_hash": server_code.source_hash(self.module)}

    def runner(self, inputs: MoEInputs, config: Config, down_config: Config | None = None, *,
               workspace: Workspace = PRIVATE) -> KernelRunner:
        reason = self.check(inputs.shape)
        if reason:
            raise ValueError(reason)
        if down_config is not None and down_config != config:
            raise ValueError(f"--kernel {self.name} runs one config for both GEMMs")
        if self.entry == ENTRY_LAUNCHER:
            return self._launcher_runner(inputs, config, workspace)
        args, kwargs = self._call_arguments(inputs)
        return ServerCallRunner(lambda: self._fused_experts(*args, **kwargs), self._override, config, inputs)
