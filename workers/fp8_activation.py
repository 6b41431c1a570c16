"""fp8_w8a8 activation quantization on the device, with the numerics of
``workers.quant.quantize_fp8_activation`` (the reference's): scale = max(amax, AMAX_FLOOR) / 448
per tensor, or per token and ``group_k``-wide K group; codes = round-to-nearest-even of
clamp(x / scale, ±448).

Why kernels and not those torch ops: the torch version takes about nine passes over the tensor
(abs, amax, casts, divide, clamp, convert), each a kernel launch; at decode sizes that cost more
than the GEMMs' own fp8 savings, at prefill sizes tens of µs of memory traffic. Here per-tensor
scaling is two passes (max, then quantize; the max of the SwiGLU output comes fused in the SwiGLU
kernel) and per-group scaling one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from workers.interpreter import interpreting, round_to
from workers.quant import AMAX_FLOOR, FP8_MAX

_BLOCK = 2048
_MAX_GROUPS_PER_PROGRAM = 16


def fp8_scale_shape(rows: int, cols: int, group_k: int | None) -> tuple[int, ...]:
    """The fp32 scale buffer's shape for ``[rows, cols]`` activations: ``[rows, ceil(cols/group_k)]``
    (``fp8_quantize_per_group``), or ``[1]`` when ``group_k`` is None (``fp8_quantize_per_tensor``)."""
    return (rows, triton.cdiv(cols, group_k)) if group_k else (1,)


def fp8_absmax(x: torch.Tensor, amax: torch.Tensor) -> None:
    """``amax[0] = max(amax[0], max |x|)`` for contiguous ``x``; zero ``amax`` first."""
    numel = x.numel()
    _absmax_kernel[(triton.cdiv(numel, _BLOCK),)](x, amax, numel, BLOCK=_BLOCK)


def fp8_quantize_per_tensor(x: torch.Tensor, amax: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    """``out`` (fp8, x's shape) and ``scale[0]`` from contiguous ``x`` and its ``amax``."""
    numel = x.numel()
    _quantize_per_tensor_kernel[(triton.cdiv(numel, _BLOCK),)](
        x, amax, out, scale, numel, AMAX_FLOOR=AMAX_FLOOR, FP8_MAX=FP8_MAX, BLOCK=_BLOCK,
        INTERPRETER=interpreting())


def fp8_quantize_per_group(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, group_k: int) -> None:
    """``out`` (fp8 ``[T, C]``) and ``scale`` (fp32 ``[T, ceil(C/group_k)]``) from ``x [T, C]``."""
    rows, cols = x.shape
    groups = triton.cdiv(cols, group_k)
    per_program = min(_MAX_GROUPS_PER_PROGRAM, triton.next_power_of_2(groups))
    _quantize_per_group_kernel[(rows, triton.cdiv(groups, per_program))](
        x, out, scale, cols, groups, x.stride(0), out.stride(0), scale.stride(0),
        GROUP_K=group_k, GROUP_K_POW2=triton.next_power_of_2(group_k), GROUPS_PER_PROGRAM=per_program,
        AMAX_FLOOR=AMAX_FLOOR, FP8_MAX=FP8_MAX, INTERPRETER=interpreting())


@triton.jit
def quantize_groups(values, out_ptrs, scale_ptrs, valid, groups_valid, AMAX_FLOOR: tl.constexpr,
                    FP8_MAX: tl.constexpr, INTERPRETER: tl.constexpr):
    """Quantize an fp32 ``[groups, group width]`` tile, one scale per group (shared with the
    fused SwiGLU kernel). ``valid`` masks elements, ``groups_valid`` groups."""
    amax = tl.max(tl.where(valid, tl.abs(values), 0.0), axis=1)
    scale = tl.maximum(amax, AMAX_FLOOR) / FP8_MAX
    codes = tl.minimum(tl.maximum(tl.math.div_rn(values, scale[:, None]), -FP8_MAX), FP8_MAX)
    tl.store(out_ptrs, round_to(codes, tl.float8e4nv, INTERPRETER), mask=valid)
    tl.store(scale_ptrs, scale, mask=groups_valid)


@triton.jit(do_not_specialize=["numel"])  # batch-size dependent: one compile for every M
def _absmax_kernel(x_ptr, amax_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0))


@triton.jit(do_not_specialize=["numel"])  # batch-size dependent: one compile for every M
def _quantize_per_tensor_kernel(x_ptr, amax_ptr, out_ptr, scale_ptr, numel, AMAX_FLOOR: tl.constexpr,
                                FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr):
    pid = tl.program_id(0)
    scale = tl.maximum(tl.load(amax_ptr), AMAX_FLOOR) / FP8_MAX
    if pid == 0:
        tl.store(scale_ptr, scale)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    codes = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
    tl.store(out_ptr + offs, round_to(codes, tl.float8e4nv, INTERPRETER), mask=mask)


@triton.jit
def _quantize_per_group_kernel(x_ptr, out_ptr, scale_ptr, cols, groups, stride_x, stride_out, stride_scale,
                               GROUP_K: tl.constexpr, GROUP_K_POW2: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
                               AMAX_FLOOR: tl.constexpr, FP8_MAX: tl.constexpr, INTERPRETER: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    inner = tl.arange(0, GROUP_K_POW2)
    col = group[:, None] * GROUP_K + inner[None, :]
    valid = (inner[None, :] < GROUP_K) & (col < cols)
    values = tl.load(x_ptr + row * stride_x + col, mask=valid, other=0.0).to(tl.float32)
    quantize_groups(values, out_ptr + row * stride_out + col, scale_ptr + row * stride_scale + group,
                    valid, group < groups, AMAX_FLOOR, FP8_MAX, INTERPRETER)
