"""The fp32 fused-MoE reference every kernel output and every tuned config is checked against.

One expert at a time on its own tokens: gathering ``[M, topk, N, K]`` weights would need hundreds
of GB at M=1024 on real shapes, while one dequantized expert is tens of MB. Weights are the
dequantized quantized ones, so the reference measures the kernel, not the quantization. For
fp8_w8a8 the activations go through the same quantize→dequantize as the kernel's: the input per
tensor (dynamic) or per token and K group, and the SwiGLU output again, over all ``M·topk`` rows.

For fp8_w8a8 the reference also rounds what the kernel stores in the activation dtype (as vLLM's
pipeline does): the up GEMM's gate/up output, and the SwiGLU output before it is quantized. An fp8
code is 16-32x coarser than a bf16 one, so a bf16 rounding the reference skipped would push some
values across an fp8 rounding boundary and show up as ~1.5e-2 (up to ~6.5e-2 at tiny shapes) of
error that is not the kernel's. Other dtypes need no such emulation (their error stays ~4e-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.quant import QuantizedWeight, dequantize_fp8_activation, quantize_fp8_activation
from workers.records import DType

SILU = "silu"
"""``silu(gate) · up`` (vLLM's and SGLang's fused-MoE kernels, moe-tune's)."""
SWIGLU_OAI = "swigluoai"
"""gpt-oss's SwiGLU, as triton_kernels' ``swiglu_fn`` (vLLM's ``SWIGLUOAI``):
``g · sigmoid(1.702 · g) · (u + 1)`` with ``g = min(gate, 7)``, ``u = clamp(up, -7, 7)``."""
RELU2 = "relu2"
"""``relu(up)²`` of non-gated experts (Nemotron-H): ``w13`` holds only the up rows ``[E, N, K]``."""
ACTIVATIONS = (SILU, SWIGLU_OAI, RELU2)
GATED_ACTIVATIONS = (SILU, SWIGLU_OAI)
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0


def activate(gate: torch.Tensor | None, up: torch.Tensor, activation: str = SILU) -> torch.Tensor:
    """The activation between the GEMMs, in fp32, on the gate and up halves of a row (``gate``
    None for the non-gated ``relu2``)."""
    if activation == RELU2:
        return F.relu(up).square()
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if gate is None:
        raise ValueError(f"{activation} is a gated activation: it needs the gate half")
    if activation == SILU:
        return F.silu(gate) * up
    gate = gate.clamp(max=SWIGLU_OAI_LIMIT)
    up = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
    return gate * torch.sigmoid(SWIGLU_OAI_ALPHA * gate) * (up + 1)


def expert_activation(gated: bool, activation: str | None = None) -> str:
    """The activation of experts that are ``gated`` (or not) under ``activation``: None means the
    experts' own (``silu`` when gated, ``relu2`` when not); a given one must fit the weights."""
    if activation is None:
        return SILU if gated else RELU2
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if gated != (activation in GATED_ACTIVATIONS):
        raise ValueError(f"activation {activation} does not fit {'gated' if gated else 'non-gated'} experts")
    return activation


def _emulate_fp8_activation(a: torch.Tensor, group_k: int | None) -> torch.Tensor:
    return dequantize_fp8_activation(*quantize_fp8_activation(a, group_k), group_k)


def reference_moe(x: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """fp32 ``[M, K]``: out[m] = sum_j topk_weights[m,j] · w2[e_j] @ act(gate_j, up_j), act
    ``silu(gate)·up`` or gpt-oss's SwiGLU, or relu(up_j)² for non-gated experts (``w13 [E, N, K]``)
    (``activate``; ``activation`` None: the experts' own, ``expert_activation``).

    ``x [M, K]`` in the activation dtype; ``w13 [E, 2N, K]`` (gate rows [0, N), up rows [N, 2N));
    ``w2 [E, K, N]``; ``topk_weights [M, topk]``; ``topk_ids [M, topk]`` in [0, E), or -1 for a pair
    computed on another GPU (expert parallelism), which contributes nothing.
    """
    M, K = x.shape
    E, up_rows, w13_k = w13.shape
    N = w2.shape[2]
    gated = up_rows == 2 * N
    if w13.dtype is not w2.dtype or w13.block_shape != w2.block_shape:
        raise ValueError(f"w13 ({w13.dtype.value}) and w2 ({w2.dtype.value}) must share dtype and block shape")
    if up_rows not in (N, 2 * N) or w13_k != K or w2.shape != (E, K, N):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w13 {w13.shape}, w2 {w2.shape}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != M:
        raise ValueError(f"routing shapes disagree: ids {tuple(topk_ids.shape)}, weights {tuple(topk_weights.shape)}")
    activation = expert_activation(gated, activation)

    fp8 = w13.dtype is DType.FP8_W8A8
    # Activation scale groups: block fp8 per block_k columns, per-channel fp8 per row (per token).
    in_group = mid_group = w13.block_shape[1] if fp8 and w13.block_shape else None
    if fp8 and w13.per_channel:
        in_group, mid_group = K, N
    a = _emulate_fp8_activation(x, in_group) if fp8 else x.float()

    # Rows of the flattened [M * topk] routing, grouped by expert; one host sync for the counts.
    # Id -1 is a pair routed to another GPU's expert (expert parallelism): it adds nothing here.
    flat_ids = topk_ids.reshape(-1).long()
    if int(flat_ids.min()) < -1:
        raise ValueError("topk_ids hold an expert id below -1")
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids + 1, minlength=E + 1).tolist()
    if len(counts) > E + 1:
        raise ValueError(f"topk_ids hold an expert >= E={E}")
    slots = list(zip(range(E), torch.split(order, counts)[1:]))
    slots = [(e, rows) for e, rows in slots if rows.numel()]
    topk = topk_ids.shape[1]

    intermediate = torch.zeros((M * topk, N), dtype=torch.float32, device=x.device)
    for e, rows in slots:
        gate_up = a[rows // topk] @ w13.dequantize_expert(e).T
        if fp8:
            gate_up = gate_up.to(x.dtype).float()
        intermediate[rows] = (activate(gate_up[:, :N], gate_up[:, N:], activation) if gated
                              else activate(None, gate_up, activation))
    if fp8:
        intermediate = _emulate_fp8_activation(intermediate.to(x.dtype), mid_group)

    out = torch.zeros((M, K), dtype=torch.float32, device=x.device)
    flat_weights = topk_weights.reshape(-1).float()
    for e, rows in slots:
        down = intermediate[rows] @ w2.dequantize_expert(e).T
        out.index_put_((rows // topk,), down * flat_weights[rows, None], accumulate=True)
    return out
