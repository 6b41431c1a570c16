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
ACTIVATIONS = (SILU, SWIGLU_OAI)
SWIGLU_OAI_ALPHA = 1.702
SWIGLU_OAI_LIMIT = 7.0


def activate(gate: torch.Tensor, up: torch.Tensor, activation: str = SILU) -> torch.Tensor:
    """The activation between the GEMMs, in fp32, on the gate and up halves of a row."""
    if activation == SILU:
        return F.silu(gate) * up
    if activation == SWIGLU_OAI:
        gate = gate.clamp(max=SWIGLU_OAI_LIMIT)
        up = up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
        return gate * torch.sigmoid(SWIGLU_OAI_ALPHA * gate) * (up + 1)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _emulate_fp8_activation(a: torch.Tensor, group_k: int | None) -> torch.Tensor:
    return dequantize_fp8_activation(*quantize_fp8_activation(a, group_k), group_k)


def reference_moe(x: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str = SILU) -> torch.Tensor:
    """fp32 ``[M, K]``: out[m] = sum_j topk_weights[m,j] · w2[e_j] @ act(gate_j, up_j), act
    ``silu(gate)·up`` or gpt-oss's SwiGLU (``activate``).

    ``x [M, K]`` in the activation dtype; ``w13 [E, 2N, K]`` (gate rows [0, N), up rows [N, 2N));
    ``w2 [E, K, N]``; ``topk_weights [M, topk]``; ``topk_ids [M, topk]``.
    """
    M, K = x.shape
    E, two_n, w13_k = w13.shape
    N = two_n // 2
    if w13.dtype is not w2.dtype or w13.block_shape != w2.block_shape:
        raise ValueError(f"w13 ({w13.dtype.value}) and w2 ({w2.dtype.value}) must share dtype and block shape")
    if w13_k != K or w2.shape != (E, K, N):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w13 {w13.shape}, w2 {w2.shape}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != M:
        raise ValueError(f"routing shapes disagree: ids {tuple(topk_ids.shape)}, weights {tuple(topk_weights.shape)}")

    fp8 = w13.dtype is DType.FP8_W8A8
    group_k = w13.block_shape[1] if fp8 and w13.block_shape else None
    a = _emulate_fp8_activation(x, group_k) if fp8 else x.float()

    # Rows of the flattened [M * topk] routing, grouped by expert; one host sync for the counts.
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=E).tolist()
    if len(counts) > E:
        raise ValueError(f"topk_ids hold an expert >= E={E}")
    slots = list(zip(range(E), torch.split(order, counts)))
    slots = [(e, rows) for e, rows in slots if rows.numel()]
    topk = topk_ids.shape[1]

    intermediate = torch.empty((M * topk, N), dtype=torch.float32, device=x.device)
    for e, rows in slots:
        gate_up = a[rows // topk] @ w13.dequantize_expert(e).T
        if fp8:
            gate_up = gate_up.to(x.dtype).float()
        intermediate[rows] = activate(gate_up[:, :N], gate_up[:, N:], activation)
    if fp8:
        intermediate = _emulate_fp8_activation(intermediate.to(x.dtype), group_k)

    out = torch.zeros((M, K), dtype=torch.float32, device=x.device)
    flat_weights = topk_weights.reshape(-1).float()
    for e, rows in slots:
        down = intermediate[rows] @ w2.dequantize_expert(e).T
        out.index_put_((rows // topk,), down * flat_weights[rows, None], accumulate=True)
    return out
