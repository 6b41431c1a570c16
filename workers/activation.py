"""The activation between the two GEMMs: SwiGLU, ``out = silu(gate) * up`` with gate/up the two
halves of a row; or, for non-gated experts (Nemotron-H; vLLM's ``relu2_no_mul``), ``relu(x)²``
of the up GEMM's N-wide row.

A Triton kernel rather than torch ops: one pass over the up GEMM's output instead of three
(slice, silu, multiply), computed in fp32 and rounded once to the output dtype. For fp8_w8a8 the
same pass prepares the down GEMM's quantization: it accumulates the max |output| for a
per-tensor scale, or quantizes each row's ``group_k``-wide groups itself for block scales (the
values it quantizes are the rounded activation-dtype ones, as ``workers.reference`` assumes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.fp8_activation import quantize_groups
from workers.interpreter import interpreting, round_to
from workers.quant import AMAX_FLOOR, FP8_MAX

_MAX_BLOCK = 1024


def swiglu(gate_up: torch.Tensor, out: torch.Tensor, amax: torch.Tensor | None = None,
           gated: bool = True) -> torch.Tensor:
    """``out [T, N] = silu(gate_up[:, :N]) * gate_up[:, N:]``; with ``gated`` False
    ``out = relu(gate_up)²`` from ``gate_up [T, N]``; returns ``out``.

    With ``amax`` (fp32 ``[1]``, zeroed by the caller) also ``amax[0] = max |out|``.
    """
    rows, n = _check_shapes(gate_up, out, gated)
    block = min(_MAX_BLOCK, triton.next_power_of_2(n))
    _swiglu_kernel[(rows, triton.cdiv(n, block))](
        gate_up, out, out if amax is None else amax, n, gate_up.stride(0), gate_up.stride(1),
        out.stride(0), out.stride(1), BLOCK=block, TRACK_AMAX=amax is not None, GATED=gated,
        INTERPRETER=interpreting())
    return out


def swiglu_fp8_groups(gate_up: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, group_k: int, dtype: torch.dtype,
                      gated: bool = True) -> None:
    """SwiGLU (``gated`` False: relu²) rounded to ``dtype``, then quantized to fp8 ``out [T, N]``
    with fp32 ``scale [T, ceil(N/group_k)]``, one per row and ``group_k`` columns (block fp8's
    activation scaling)."""
    rows, n = _check_shapes(gate_up, out, gated)
    groups = triton.cdiv(n, group_k)
    per_program = max(1, min(triton.next_power_of_2(groups), _MAX_BLOCK // triton.next_power_of_2(group_k)))
    _swiglu_fp8_groups_kernel[(rows, triton.cdiv(groups, per_program))](
        gate_up, out, scale, n, groups, gate_up.stride(0), gate_up.stride(1), out.stride(0), scale.stride(0),
        GROUP_K=group_k, GROUP_K_POW2=triton.next_power_of_2(group_k), GROUPS_PER_PROGRAM=per_program, GATED=gated,
        ROUND_TO=tl.float16 if dtype == torch.float16 else tl.bfloat16,
        AMAX_FLOOR=AMAX_FLOOR, FP8_MAX=FP8_MAX, INTERPRETER=interpreting())


def _check_shapes(gate_up: torch.Tensor, out: torch.Tensor, gated: bool) -> tuple[int, int]:
    rows, width = gate_up.shape
    n = width // 2 if gated else width
    if width != (2 * n if gated else n) or out.shape != (rows, n):
        wanted = "[T, 2N]" if gated else "[T, N]"
        raise ValueError(f"need gate_up {wanted} and out [T, N], got {tuple(gate_up.shape)} and {tuple(out.shape)}")
    return rows, n


@triton.jit
def _silu_mul(in_row, cols, n, stride_in_col, mask, GATED: tl.constexpr):
    gate = tl.load(in_row + cols * stride_in_col, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(in_row + (cols + n) * stride_in_col, mask=mask, other=0.0).to(tl.float32)
        return gate / (1.0 + tl.exp(-gate)) * up
    relu = tl.maximum(gate, 0.0)
    return relu * relu


@triton.jit
def _swiglu_kernel(gate_up_ptr, out_ptr, amax_ptr, n, stride_in_row, stride_in_col, stride_out_row, stride_out_col,
                   BLOCK: tl.constexpr, TRACK_AMAX: tl.constexpr, GATED: tl.constexpr, INTERPRETER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    result = round_to(_silu_mul(gate_up_ptr + row * stride_in_row, cols, n, stride_in_col, mask, GATED),
                      out_ptr.dtype.element_ty, INTERPRETER)
    tl.store(out_ptr + row * stride_out_row + cols * stride_out_col, result, mask=mask)
    if TRACK_AMAX:
        tl.atomic_max(amax_ptr, tl.max(tl.abs(result.to(tl.float32)), axis=0))


@triton.jit
def _swiglu_fp8_groups_kernel(gate_up_ptr, out_ptr, scale_ptr, n, groups, stride_in_row, stride_in_col,
                              stride_out_row, stride_scale_row, GROUP_K: tl.constexpr, GROUP_K_POW2: tl.constexpr,
                              GROUPS_PER_PROGRAM: tl.constexpr, GATED: tl.constexpr, ROUND_TO: tl.constexpr,
                              AMAX_FLOOR: tl.constexpr,
                              FP8_MAX: tl.constexpr, INTERPRETER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    inner = tl.arange(0, GROUP_K_POW2)
    cols = group[:, None] * GROUP_K + inner[None, :]
    valid = (inner[None, :] < GROUP_K) & (cols < n)
    values = _silu_mul(gate_up_ptr + row * stride_in_row, cols, n, stride_in_col, valid, GATED)
    values = round_to(values, ROUND_TO, INTERPRETER).to(tl.float32)
    quantize_groups(values, out_ptr + row * stride_out_row + cols, scale_ptr + row * stride_scale_row + group,
                    valid, group < groups, AMAX_FLOOR, FP8_MAX, INTERPRETER)
