"""``triton_kernels``: triton_kernels' ``matmul_ogs`` MoE, the kernel vLLM 0.33 runs for MXFP4 on
Hopper (its TRITON mxfp4 backend, ``OAITritonMxfp4ExpertsMonolithic``) and SGLang runs for gpt-oss
(its ``triton_kernel`` MoE runner).

One call, as vLLM's ``triton_kernel_moe_forward`` makes it with triton_kernels' 3.5 API and no
expert map: ``routing(router_logits, topk, sm_first=False)`` (top-k, softmax over the chosen, the
expert histogram and gather/scatter indices), then ``matmul_ogs`` for gate/up with the gathered
rows and gpt-oss's SwiGLU fused in (``swiglu_fn``: gate and up interleaved along the output,
``gate·sigmoid(1.702·gate)·(up + 1)`` with gate clamped above at 7 and up to ±7), then
``matmul_ogs`` for down with the routing weights applied and rows scatter-summed into ``[M, K]``.

Weights are prepared as vLLM's ``_swizzle_mxfp4`` does on Hopper (``prepare_mxfp4``): gate and up
rows interleaved, the scale's K groups padded to a multiple of 4 (vLLM's patch for triton_kernels
< 3.8), both transposed so the MX axis is dim 1, values in ``HopperMXValueLayout(mx_axis=1)``, scales
in ``HopperMXScaleLayout(mx_axis=1, num_warps=8)``, and the launch constraint ``split_k=1``. bf16
weights go in as SGLang's triton_kernels runner stores them: ``[E, K, 2N]`` row-major, interleaved.
gpt-oss's expert biases are left out (None): they add one vector load per output tile.

Launch choices: ``matmul_ogs`` picks block sizes, warps, stages, split-k, persistence and the
fused scatter itself (``matmul_ogs_details.opt_flags``) per call from M, N, K, E and dtypes; the
only way to change them is the process-wide ``update_opt_flags_constraints`` (vLLM and SGLang set
``split_k=1`` on Hopper in code). Neither server reads tuned values for it from any file, flag or
environment variable, so ``config`` is ignored here: there is nothing a server could be given.

The worker's fp32 reference must use the same activation: ``ACTIVATION`` names it
(``workers.reference.reference_moe(..., activation=...)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
from pathlib import Path
from types import ModuleType

import torch

from workers.backends import TRITON_KERNELS
from workers.backends.base import BackendUnavailable, KernelBackend, MoEInputs
from workers.quant import MXFP4_BLOCK, QuantizedWeight
from workers.records import Config, DType, MoEShape
from workers.reference import SWIGLU_OAI
from workers.workspace import PRIVATE, Workspace

PACKAGES = ("triton_kernels", "vllm.third_party.triton_kernels")
"""Where triton_kernels is imported from, first found wins (vLLM vendors a copy)."""
ACTIVATION = SWIGLU_OAI
SWIGLU_ALPHA = 1.702  # gpt-oss, as vLLM's triton_kernel_fused_experts defaults
SWIGLU_LIMIT = 7.0
SCALE_NUM_WARPS = 8  # vLLM's _swizzle_mxfp4 default, and SGLang's
ROUTER_MASK = -3.0e4
"""Logit of the experts a token does not pick (any value far below log(1/topk) works in bf16)."""
SUPPORTED = (DType.MXFP4, DType.BF16)


def import_package() -> ModuleType:
    """triton_kernels as installed, else vLLM's vendored copy; BackendUnavailable otherwise."""
    errors = []
    for name in PACKAGES:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise BackendUnavailable("triton_kernels is not importable (" + "; ".join(errors) + "); "
                             "pip install triton_kernels, or put a folder holding the triton_kernels package on PYTHONPATH")


def _module(package: ModuleType, name: str) -> ModuleType:
    return importlib.import_module(f"{package.__name__}.{name}")


def interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """``[E, 2N, C]`` with gate rows [0, N) then up rows [N, 2N) (moe-tune's layout) →
    rows gate0, up0, gate1, up1, ... (gpt-oss's checkpoint layout, which ``swiglu_fn`` reads)."""
    E, two_n, C = t.shape
    n = two_n // 2
    return t.view(E, 2, n, C).transpose(1, 2).reshape(E, two_n, C)


@dataclasses.dataclass
class PreparedWeight:
    """A weight as ``matmul_ogs`` reads it: ``data`` (a triton_kernels Tensor for mxfp4, a torch
    view ``[E, K_gemm, N_gemm]`` for bf16) and its ``PrecisionConfig``."""

    data: object
    precision: object


def prepare_mxfp4(weight: QuantizedWeight, package: ModuleType, hopper: bool = True) -> tuple[object, object]:
    """vLLM 0.33's ``_swizzle_mxfp4`` for Hopper on a ``[E, R, C//2]`` packed weight with its
    ``[E, R, C//32]`` E8M0 scales: returns ``(values, scales)`` as triton_kernels Tensors in the
    Hopper layouts (``hopper=False``: strided layouts, what triton_kernels uses below SM90).
    Shapes seen by matmul_ogs: values ``[E, C, R]`` (FP4), scales ``[E, ceil4(C/32), R]``."""
    tensor = _module(package, "tensor")
    layout = _module(package, "tensor_details.layout")
    data, scale = weight.data, weight.scale
    pad_groups = -scale.shape[-1] % 4  # vLLM: "pad K (num scale groups) to 0 mod 4" on SM90
    if pad_groups:
        scale = torch.nn.functional.pad(scale, (0, pad_groups))
    data, scale = data.transpose(-2, -1), scale.transpose(-2, -1)
    if hopper:
        value_layout, value_opts = layout.HopperMXValueLayout, {"mx_axis": 1}
        scale_layout, scale_opts = layout.HopperMXScaleLayout, {"mx_axis": 1, "num_warps": SCALE_NUM_WARPS}
    else:
        value_layout, value_opts = layout.StridedLayout, {}
        scale_layout, scale_opts = layout.StridedLayout, {}
    values = tensor.convert_layout(tensor.wrap_torch_tensor(data, dtype=tensor.FP4), value_layout, **value_opts)
    scales = tensor.convert_layout(tensor.wrap_torch_tensor(scale), scale_layout, **scale_opts)
    return values, scales


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def prepare(weight: QuantizedWeight, package: ModuleType, interleave: bool) -> PreparedWeight:
    """``weight`` (moe-tune's ``[E, R, C]`` layout) as matmul_ogs reads it; gate/up interleaved
    first when ``interleave`` (the w13 weight)."""
    ogs = _module(package, "matmul_ogs")
    if weight.dtype is DType.BF16:  # stored [E, K, N] row-major, as SGLang's triton_kernels runner keeps it
        data = interleave_gate_up(weight.data) if interleave else weight.data
        return PreparedWeight(data.transpose(-2, -1).contiguous(), ogs.PrecisionConfig())
    data, scale = weight.data, weight.scale
    if interleave:
        data, scale = interleave_gate_up(data), interleave_gate_up(scale)
    hopper = _hopper(data.device)
    if hopper:
        opt_flags = _module(package, "matmul_ogs_details.opt_flags")
        opt_flags.update_opt_flags_constraints({"split_k": 1})
    values, scales = prepare_mxfp4(QuantizedWeight(DType.MXFP4, data, scale), package, hopper=hopper)
    numerics = _module(package, "numerics")
    precision = ogs.PrecisionConfig(weight_scale=scales, flex_ctx=ogs.FlexCtx(rhs_data=numerics.InFlexData()))
    return PreparedWeight(values, precision)


class OgsRunner:
    """One matmul_ogs MoE call on fixed inputs (module docstring). ``run()`` launches the routing
    and both GEMMs; matmul_ogs allocates its own scratch per call (from torch's caching allocator,
    as in vLLM's CUDA graphs); ``output`` is ``[M, K]``."""

    def __init__(self, package: ModuleType, inputs: MoEInputs, workspace: Workspace = PRIVATE) -> None:
        shape = inputs.shape
        self._routing = _module(package, "routing").routing
        ogs = _module(package, "matmul_ogs")
        self._matmul = ogs.matmul_ogs
        self._w13 = prepare(inputs.w13, package, interleave=True)
        self._w2 = prepare(inputs.w2, package, interleave=False)
        self._activation = _fused_swiglu(ogs, _module(package, "swiglu").swiglu_fn)
        x, M, topk = inputs.x, inputs.x.shape[0], shape.topk
        self._x = x
        self._topk = topk
        # Router logits whose top-k are the problem's experts, softmax over them its weights.
        logits = torch.full((M, shape.E), ROUTER_MASK, dtype=x.dtype, device=x.device)
        self._logits = logits.scatter(1, inputs.topk_ids.long(), inputs.topk_weights.log().to(x.dtype))
        self._intermediate = workspace.empty("intermediate", (1, M * topk, shape.N), x.dtype, x.device)
        self.output = workspace.empty("output", (1, M, shape.K), x.dtype, x.device)

    def run(self) -> torch.Tensor:
        routing_data, gather, scatter = self._routing(self._logits, self._topk, sm_first=False)
        self._matmul(self._x, self._w13.data, None, routing_data, gather_indx=gather,
                     precision_config=self._w13.precision, fused_activation=self._activation, y=self._intermediate)
        self._matmul(self._intermediate.view(-1, self._intermediate.shape[-1]), self._w2.data, None, routing_data,
                     scatter_indx=scatter, precision_config=self._w2.precision, gammas=routing_data.gate_scal,
                     y=self.output)
        return self.output.view(self.output.shape[1:])


def _fused_swiglu(ogs: ModuleType, swiglu_fn: object) -> object:
    """gpt-oss's SwiGLU as matmul_ogs's fused activation, in the API of the triton_kernels at hand
    (3.5: ``reduction_n`` is a field of FusedActivation; later: of FnSpecs)."""
    specs_fields = {f.name for f in dataclasses.fields(ogs.FnSpecs)}
    if "reduction_n" in specs_fields:
        return ogs.FusedActivation(ogs.FnSpecs("swiglu", swiglu_fn, ("alpha", "limit"), reduction_n=2),
                                   (SWIGLU_ALPHA, SWIGLU_LIMIT))
    return ogs.FusedActivation(ogs.FnSpecs("swiglu", swiglu_fn, ("alpha", "limit")), (SWIGLU_ALPHA, SWIGLU_LIMIT), 2)


def _source_hash(package: ModuleType) -> str:
    root = Path(package.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class TritonKernelsBackend(KernelBackend):
    name = TRITON_KERNELS
    activation = ACTIVATION

    def __init__(self) -> None:
        self.package = import_package()
        self._describe = {
            "kernel": self.name,
            "kernel_entry": f"{self.package.__name__}.matmul_ogs.matmul_ogs (+ routing.routing, swiglu_fn)",
            "kernel_version": f"{self.package.__name__} {getattr(self.package, '__version__', 'unversioned')}",
            "kernel_hash": _source_hash(self.package),
        }

    def describe(self) -> dict[str, str]:
        return dict(self._describe)

    def check(self, shape: MoEShape) -> str | None:
        if shape.dtype not in SUPPORTED:
            return f"triton_kernels backend runs {', '.join(d.value for d in SUPPORTED)}, not {shape.dtype.value}"
        if shape.dtype is DType.MXFP4 and (shape.K % MXFP4_BLOCK or shape.N % MXFP4_BLOCK):
            return f"mxfp4 needs N and K multiples of {MXFP4_BLOCK} (pad as the servers do)"
        return None

    def validate(self, config: Config, shape: MoEShape) -> None:
        """Every fused-MoE config is refused: matmul_ogs takes none (its launch flags are its own
        heuristic's, see the module docstring), so there is nothing to tune in this backend."""
        raise ValueError("matmul_ogs takes no fused-MoE config: its launch flags come from triton_kernels' "
                         "heuristic, which no server lets a user override; time it with config None")

    def runner(self, inputs: MoEInputs, config: Config | None, down_config: Config | None = None, *,
               workspace: Workspace = PRIVATE) -> OgsRunner:
        """The matmul_ogs call on ``inputs``; ``config`` must be None (``validate``)."""
        problem = self.check(inputs.shape)
        if problem:
            raise ValueError(problem)
        if config is not None or down_config is not None:
            self.validate(config or down_config, inputs.shape)
        return OgsRunner(self.package, inputs, workspace)
