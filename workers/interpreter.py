"""Running the kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``) without wrong bf16.

Seen with Triton 3.9's interpreter, which stores bf16 as raw 16-bit integers:
- ``tl.dot`` on bf16 operands, bf16 × bf16 products and int8 → bf16 conversions compute on the
  raw bit patterns (garbage; fp16 and fp8 are fine);
- fp32 → bf16 rounds toward zero, and with ``fp_downcast_rounding="rtne"`` loses the carry into
  the exponent (off by up to a whole ulp), which biases sums enough to break error bounds;
- fp32 → fp8 E4M3 rounds half away from zero and flushes E4M3's subnormals to zero.

Kernels take an ``INTERPRETER`` constexpr, set only when interpreting, and use the helpers here:
the switch is resolved at compile time, so on the GPU it costs nothing.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether kernels run under the interpreter (Triton reads this when kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 → ``DTYPE`` rounding to nearest even (by integer arithmetic when interpreting).

    fp8 E4M3 inputs must already lie within ±448 (the callers saturate first).
    """
    if INTERPRETER and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    if INTERPRETER and DTYPE == tl.float8e4nv:
        return _e4m3_code(x).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _e4m3_code(x):
    """The E4M3 code (int32 0..255) nearest to ``x`` (|x| <= 448), ties to even.

    Below 2^-6 the codes are multiples of 2^-9 (subnormals; 8 is 2^-6 itself): round |x|·2^9 to
    an integer by adding and subtracting 2^23. Above, round the fp32 mantissa to 3 bits and rebias
    the exponent from 127 to 7.
    """
    magnitude = tl.abs(x)
    subnormal = ((magnitude * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    bits = magnitude.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (((bits >> 23) - 120) << 3) | ((bits >> 20) & 7)
    code = tl.where(magnitude < 0.015625, subnormal, normal)
    return code | tl.where(x.to(tl.int32, bitcast=True) < 0, 0x80, 0)  # the sign bit, -0.0 too


@triton.jit
def dot(a, b, acc, INTERPRETER: tl.constexpr):
    """``acc + a @ b`` in fp32; bf16 operands go through fp32 when interpreting."""
    if INTERPRETER and (a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)
