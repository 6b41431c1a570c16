"""The builtin fp4 kernel's prepared weight layout ("atoms"): each thread's bytes contiguous, in
the order the MMA's register operand wants them, bits placed for a cheap decode.

A weight ``[E, R, C]`` (mxfp4 or nvfp4, ``workers.quant.QuantizedWeight``) is cut into atoms of
16 rows × 64 K values (512 bytes), stored as int32 words ``data [E, ceil(R/16), ceil(C/64), 128]``
(rows and K padded with code 0). Inside an atom, lane ``4g + q`` of a warp owns words
``4·lane .. 4·lane + 3`` (16 contiguous bytes): the values of rows ``g`` and ``g + 8`` at K offsets
``16c + 8p + 2q + e`` (c = 0..3, p, e = 0, 1) — exactly what one thread holds of four 16 × 16
fragments of an ``mma``/``wgmma`` register A operand (bf16). Word ``2r + h`` of a lane holds row
``g + 8r`` and chunks ``c = 2h, 2h + 1``: 8 values, (c, p, e) for c, p, e in {0, 1}. Its bits: the
value (c, p, e) has its sign, exponent (2 bits) and mantissa bit at ``WORD_BITS[2c + p]`` + 16e, so
the decode gets output 2c + p — a bf16x2 register holding the K pair e = 0, 1 the fragment wants —
by one mask (output 0), a shift and a mask (1, 2), or three of each (3), plus the multiplies
(``workers.fused_moe_kernel._atom_word_ptx``): no data moves between threads or registers.

Scales stay one byte per block, K-group-major ``[E, 16·ceil(R/16), ceil(C/64)·64/group]``
(strides ``(R·G, 1, R)``; padding 0):
- mxfp4: byte ``t = s − d_e`` of E8M0 exponent ``s``, with ``d_e = max(0, max_s − 128)`` per
  expert and ``global_scale = 2^d_e`` (fp32, applied to the accumulator as nvfp4's). The kernel
  turns ``t`` into the bf16 ``2^(t−1)`` = scale·2^126·2^−d_e with one integer multiply-add (always
  a normal number), which folds the decode's 2^126 into the scale: one bf16x2 multiply per two
  weights instead of two (both formats). ValueError for an E8M0 NaN (0xFF) or an expert whose scales span more
  than 128 binades (not exactly representable this way).
- nvfp4: byte ``u`` of |s|·2^117 (``_nvfp4_scale_bytes``; the kernel makes its bf16 with one
  multiply-add as well), ``global_scale`` times 2^9; a negative scale flips its block's code
  signs and a zero scale zeroes its codes (the same products). ValueError for a NaN scale.

Why: the row-major layout makes Triton stage the packed bytes through shared memory and read
them back in 2-byte pieces in the operand layout (``benchmarks/fp4_sass_count.py`` counts the
cost per weight byte). The idea — permute and bit-interleave the values offline so each thread's
share of the operand is one contiguous vector that decodes with masks and shifts — is the one of
triton_kernels' Hopper value layout; the atom, word format and scale handling here are this
kernel's own.
"""

from __future__ import annotations

import dataclasses

import torch

from workers.formats import format_of
from workers.quant import E8M0_NAN, QuantizedWeight, unpack_nibbles
from workers.records import DType

ATOM_ROWS, ATOM_K, ATOM_WORDS = 16, 64, 128
WORD_BITS = ((15, 8, 7, 6), (12, 5, 4, 3), (9, 2, 1, 0), (14, 13, 11, 10))
"""Per decode output 2c + p: the low-half bit positions of a value's sign, exponent bits 1 and 0
and mantissa bit (E2M1 code bits 3..0); the high half (e = 1) is 16 bits up."""


@dataclasses.dataclass(frozen=True)
class Fp4Atoms:
    """An fp4 weight in the atom layout (module docstring); ``shape`` is the logical ``(E, R, C)``."""

    dtype: DType
    data: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor
    shape: tuple[int, int, int]

    block_shape = None  # as QuantizedWeight's for fp4
    per_channel = False


def group_major(scale: torch.Tensor) -> torch.Tensor:
    """Block scales ``[E, R, G]`` with the same values stored K-group-major: strides ``(R·G, 1, R)``
    (a copy). Both fp4 layouts the kernel reads keep their scales so (``launch_layout``, atoms)."""
    return scale.transpose(1, 2).contiguous().transpose(1, 2)


def fits_atoms(block_n: int, block_k: int) -> bool:
    """Whether a tile of ``block_n`` weight rows and ``block_k`` K values covers whole atoms."""
    return block_n % ATOM_ROWS == 0 and block_k % ATOM_K == 0


NVFP4_SHIFT = 9
"""nvfp4 scales are stored as |s|·2^(126 − NVFP4_SHIFT) (≤ 448·2^117 < 2^126: a normal bf16) and
the global scale times 2^NVFP4_SHIFT; every product value·|s|·2^−9 stays a normal bf16 (≥ 2^−19)."""


def _nvfp4_scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """E4M3 scales → bytes ``u`` with bf16 bits ``16u + 0x7580`` = |s|·2^117 (exponent field
    (u >> 3) + 235, mantissa u & 7: |s|·2^117 spans 2^108 .. 1.75·2^125 with at most 4 significant
    bits, subnormal E4M3 included). Zero scales give 0 (their codes are zeroed)."""
    magnitude = scale.to(torch.float32).abs() * 2.0 ** (126 - NVFP4_SHIFT)
    bits = magnitude.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    u = torch.where(magnitude > 0, (bits - 0x7580) >> 4, 0)
    return u.to(torch.uint8)


def prepare_atoms(weight: QuantizedWeight) -> Fp4Atoms:
    """``weight`` (mxfp4/nvfp4, as ``workers.quant`` stores it) in the atom layout. ValueError for
    another dtype or scales the layout cannot carry exactly (module docstring)."""
    if weight.dtype not in (DType.MXFP4, DType.NVFP4):
        raise ValueError(f"the atom layout is for mxfp4/nvfp4, not {weight.dtype.value}")
    E, R, C = weight.shape
    group = format_of(weight.dtype).scale_group
    rows, cols = -(-R // ATOM_ROWS) * ATOM_ROWS, -(-C // ATOM_K) * ATOM_K
    if weight.data.is_meta:  # compile-ahead runners: shapes, strides and dtypes only
        scale = group_major(torch.empty((E, rows, cols // group), dtype=torch.uint8, device="meta"))
        return Fp4Atoms(weight.dtype, torch.empty((E, rows // ATOM_ROWS, cols // ATOM_K, ATOM_WORDS),
                                                  dtype=torch.int32, device="meta"),
                        scale, torch.empty(E, dtype=torch.float32, device="meta"), (E, R, C))
    codes = torch.zeros((E, rows, cols), dtype=torch.uint8, device=weight.data.device)
    codes[:, :R, :C] = unpack_nibbles(weight.data)
    if weight.dtype is DType.NVFP4:
        # value · s = (−value) · |s| and value · 0 = +0: a block's codes take its scale's sign,
        # and a zero scale zeroes them, so the scale bytes carry |s| > 0 only.
        # (per block, broadcast over its group: no scale tensor of the weight's size)
        s = weight.scale.to(torch.float32)
        if not bool(torch.isfinite(s).all()):
            raise ValueError("nvfp4 scale NaN cannot be prepared for the atom layout")
        block = codes[:, :R, :C].unflatten(2, (C // group, group))
        block ^= torch.where(s < 0, 8, 0).to(torch.uint8)[..., None]
        block.masked_fill_((s == 0)[..., None], 0)
    # [E, i, r, g, j, h, c, p, q, e] → [E, i, j, g, q, r, h, c, p, e]
    # uint8 until each (c, p, e) slice is widened: int64 codes of a whole weight would take 8× its values
    codes = codes.reshape(E, rows // ATOM_ROWS, 2, 8, cols // ATOM_K, 2, 2, 2, 4, 2)
    codes = codes.permute(0, 1, 4, 3, 8, 2, 5, 6, 7, 9)
    words = torch.zeros(codes.shape[:-3], dtype=torch.int64, device=codes.device)
    for c in range(2):
        for p in range(2):
            for e in range(2):
                code = codes[..., c, p, e].to(torch.int64)
                for bit, position in zip((3, 2, 1, 0), WORD_BITS[2 * c + p]):
                    words |= ((code >> bit) & 1) << (position + 16 * e)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    data = words.reshape(E, rows // ATOM_ROWS, cols // ATOM_K, ATOM_WORDS).contiguous()

    groups = cols // group
    scale = torch.zeros((E, rows, groups), dtype=torch.uint8, device=weight.data.device)
    if weight.dtype is DType.MXFP4:
        s = weight.scale.to(torch.int32)
        if bool((s == E8M0_NAN).any()):
            raise ValueError("mxfp4 scale 0xFF (NaN) cannot be prepared for the atom layout")
        top = s.flatten(1).amax(dim=1) if s.numel() else torch.zeros(E, dtype=torch.int32)
        offset = (top - 128).clamp(min=0)
        t = s - offset[:, None, None]
        if bool((t < 0).any()):
            raise ValueError("an expert's mxfp4 scales span more than 128 binades: not exact in the atom layout")
        scale[:, :R, :C // group] = t.to(torch.uint8)
        global_scale = torch.exp2(offset.to(torch.float32))
    else:
        scale[:, :R, :C // group] = _nvfp4_scale_bytes(weight.scale)
        global_scale = weight.global_scale.to(torch.float32) * 2.0 ** NVFP4_SHIFT
    return Fp4Atoms(weight.dtype, data, group_major(scale), global_scale.contiguous(), (E, R, C))
