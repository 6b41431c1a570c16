"""SwiGLU between the two GEMMs: ``out = silu(gate) * up`` with gate/up the two halves of a row.

A Triton kernel rather than torch ops: one pass over the up GEMM's output instead of three
(slice, silu, multiply), computed in fp32 and rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.interpreter import interpreting, round_to

_MAX_BLOCK = 1024


def swiglu(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [T, N] = silu(gate_up[:, :N]) * gate_up[:, N:]``; returns ``out``."""
    rows, width = gate_up.shape
    n = width // 2
    if width != 2 * n or out.shape != (rows, n):
        raise ValueError(f"need gate_up [T, 2N] and out [T, N], got {tuple(gate_up.shape)} and {tuple(out.shape)}")
    block = min(_MAX_BLOCK, triton.next_power_of_2(n))
    _swiglu_kernel[(rows, triton.cdiv(n, block))](
        gate_up, out, n, gate_up.stride(0), gate_up.stride(1), out.stride(0), out.stride(1),
        BLOCK=block, INTERPRETER=interpreting())
    return out


@triton.jit
def _swiglu_kernel(gate_up_ptr, out_ptr, n, stride_in_row, stride_in_col, stride_out_row, stride_out_col,
                   BLOCK: tl.constexpr, INTERPRETER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    in_row = gate_up_ptr + row * stride_in_row
    gate = tl.load(in_row + cols * stride_in_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_row + (cols + n) * stride_in_col, mask=mask, other=0.0).to(tl.float32)
    result = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out_row + cols * stride_out_col,
             round_to(result, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)
