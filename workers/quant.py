"""Weight and activation quantizers (and their inverses) for every dtype the fused-MoE kernel runs.

The layouts are the ones the kernel reads (see ``QuantizedWeight``); the numerics follow vLLM's
fused MoE for fp8_w8a8 and int8_w8a16, the OCP Microscaling spec (gpt-oss checkpoint layout) for
mxfp4, and NVIDIA's two-level scaling for nvfp4. Everything is vectorised torch; weights are
processed one expert at a time so real shapes (e.g. ``[128, 5760, 2880]``) keep temporaries at
a few hundred MB on a GPU.

Scale rules, chosen here and relied on by the tests:

- fp8 (E4M3FN, max 448): scale = amax / 448 over the scaled group (per expert, per output
  channel, per ``[bn, bk]`` weight block, per activation tensor, or per token and ``group_k``-wide
  K group; per-channel weights go with per-token activations, one group per row); amax is
  clamped to ``AMAX_FLOOR`` so all-zero groups get a finite scale and zero codes. Partial blocks at
  the edges of a shape that is not a multiple of the block use the amax of the elements they have.
- int8_w8a16: symmetric per output channel, scale = amax / 127, round half to even, clamp ±127.
- int4_w4a16: symmetric per output channel and ``group_size`` inputs along K (GPTQ's and
  compressed-tensors' symmetric rule): scale = amax / 7.5 (half the 16 levels), q = round half to
  even of w / scale clamped to [-8, 7], stored as the nibble q + 8 (the servers' kernels subtract
  8 when a checkpoint has no zero points), two per byte along K with element 2i in the low nibble;
  scales kept in the activation dtype (bf16), as the servers keep GPTQ/AWQ/compressed-tensors
  scales, so a config reads the bytes it reads in the server.
- mxfp4: the OCP MX rule, scale = 2^(floor(log2(amax)) - 2), where 2 is E2M1's largest exponent.
  A block whose max is exactly 6·2^e gets 2^e; a block whose max lies in (6·2^e, 8·2^e) also gets
  2^e and its largest elements saturate to ±6. The exponent is clamped to the E8M0 range
  [-127, 127]; an all-zero block gets the smallest scale 2^-127 (code 0x00), and a block holding a
  NaN or inf gets the NaN scale 0xFF (its values then dequantize to NaN).
- nvfp4: global scale (per expert) = amax / (448·6), so every block scale
  block_amax / 6 / global lands in E4M3's range (<= 448); block scales are rounded to E4M3 and the
  values divided by (block scale · global scale). A block whose E4M3 scale rounds to 0 holds zeros.
- E2M1 encoding for both fp4 formats: round to nearest on the grid ±{0, .5, 1, 1.5, 2, 3, 4, 6},
  ties to the even code (0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4),
  saturating at ±6; the sign is kept, so small negatives give code 0x8 (-0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.formats import format_of
from workers.records import INT4_DEFAULT_GROUP, DType, WeightGrid

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_ZERO = 8
"""The offset of int4_w4a16's stored nibbles (symmetric checkpoints have no zero points)."""
INT4_LEVELS_HALF = 7.5
E2M1_MAX = 6.0
MXFP4_BLOCK = format_of(DType.MXFP4).scale_group
NVFP4_BLOCK = format_of(DType.NVFP4).scale_group
E8M0_BIAS = 127
E8M0_NAN = 0xFF
AMAX_FLOOR = 1e-10
"""Smallest amax a scale is computed from (vLLM's eps), so all-zero groups never divide by zero."""

# Magnitudes of E2M1 codes 0..7; code | 0x8 is the negative value.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between consecutive magnitudes, and whether a tie there rounds up (to an even code).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)


def activation_dtype(dtype: DType) -> torch.dtype:
    """The dtype of activations (and of bf16/fp16 weights): fp16 for fp16, bf16 for all others."""
    return torch.float16 if DType(dtype) is DType.FP16 else torch.bfloat16


@dataclass
class QuantizedWeight:
    """A stacked expert weight ``[E, R, C]`` in the layout the kernel reads (C is the GEMM's K).

    ``data``: bf16/fp16 ``[E,R,C]``; fp8 ``float8_e4m3fn [E,R,C]``; int8 ``[E,R,C]``; mxfp4/nvfp4
    ``uint8 [E,R,C//2]`` with element 2i in the low nibble. ``scale``: None for bf16/fp16; fp8
    per-tensor fp32 ``[E]``; fp8 block fp32 ``[E, ceil(R/bn), ceil(C/bk)]``; int8 fp32 ``[E,R]``;
    mxfp4 uint8 E8M0 ``[E,R,C//32]``; nvfp4 float8_e4m3fn ``[E,R,C//16]``; int4_w4a16 ``uint8
    [E,R,C//2]`` (nibble q + 8, element 2i low) with bf16 scales ``[E,R,C//group]``. ``global_scale``:
    nvfp4 fp32 ``[E]``. ``block_shape``: ``(bn, bk)`` for block fp8, ``(0, group)`` for int4_w4a16,
    else None.
    """

    dtype: DType
    data: torch.Tensor
    scale: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    block_shape: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The logical ``(E, R, C)`` (fp4 formats pack two values per byte)."""
        E, R, C = self.data.shape
        return (E, R, 2 * C) if self.dtype in (DType.MXFP4, DType.NVFP4, DType.INT4_W4A16) else (E, R, C)

    @property
    def per_channel(self) -> bool:
        """fp8_w8a8 with one weight scale per output channel (``scale [E, R]``; compressed-tensors'
        channel strategy), run with per-token dynamic activation scales."""
        return self.dtype is DType.FP8_W8A8 and self.block_shape is None and self.scale is not None \
            and self.scale.dim() == 2

    @property
    def int4_group(self) -> int:
        """int4_w4a16's group along C (a channel-wise ``-1`` is the whole row)."""
        group = self.block_shape[1]
        return self.shape[2] if group == -1 else group

    def dequantize_expert(self, expert: int) -> torch.Tensor:
        """fp32 ``[R, C]`` of one expert: the reference's unit, so real shapes never need ``[E,R,C]`` fp32."""
        data = self.data[expert]
        if self.dtype in (DType.BF16, DType.FP16):
            return data.float()
        if self.dtype is DType.FP8_W8A8:
            if self.per_channel:
                return data.float() * self.scale[expert][:, None]
            if self.block_shape is None:
                return data.float() * self.scale[expert]
            return _dequantize_fp8_blocks(data, self.scale[expert], self.block_shape)
        if self.dtype is DType.INT8_W8A16:
            return data.float() * self.scale[expert][:, None]
        if self.dtype is DType.INT4_W4A16:
            return dequantize_int4(data, self.scale[expert], self.int4_group)
        if self.dtype is DType.MXFP4:
            return dequantize_mxfp4(data, self.scale[expert], torch.float32)
        return dequantize_nvfp4(data, self.scale[expert], self.global_scale[expert], torch.float32)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[E, R, C]``."""
        out = torch.empty(self.shape, dtype=torch.float32, device=self.data.device)
        for expert in range(out.shape[0]):
            out[expert] = self.dequantize_expert(expert)
        return out


def quantize_weight(w: torch.Tensor, dtype: DType, block_shape: tuple[int, int] | None = None,
                    per_channel: bool = False) -> QuantizedWeight:
    """Quantize a float ``[E, R, C]`` expert weight to ``dtype`` (one expert at a time).

    ``block_shape = (bn, bk)`` selects block-wise fp8 (only valid with fp8_w8a8); for int4_w4a16
    ``(0, group)`` names the group size (default ``INT4_DEFAULT_GROUP``; -1: one group per row,
    channel-wise, kept as -1 so both weights of a layer share it). ``per_channel`` selects fp8_w8a8
    with one scale per output channel (amax / 448 of each row).
    """
    if per_channel and (DType(dtype) is not DType.FP8_W8A8 or block_shape is not None):
        raise ValueError("per_channel applies to fp8_w8a8 without a block shape")
    dtype = DType(dtype)
    if w.dim() != 3:
        raise ValueError(f"expert weight must be [E, R, C], got shape {tuple(w.shape)}")
    if dtype is DType.INT4_W4A16:
        named = int(block_shape[1]) if block_shape is not None else INT4_DEFAULT_GROUP
        E, R, C = w.shape
        group = C if named == -1 else named
        data = torch.empty((E, R, C // 2), dtype=torch.uint8, device=w.device)
        scale = torch.empty((E, R, -(-C // group)), dtype=torch.bfloat16, device=w.device)
        for e in range(E):
            data[e], scale[e] = quantize_int4(w[e], group)
        return QuantizedWeight(dtype, data, scale, block_shape=(0, named))
    if block_shape is not None:
        if dtype is not DType.FP8_W8A8:
            raise ValueError(f"block_shape applies to fp8_w8a8 only, not {dtype.value}")
        block_shape = (int(block_shape[0]), int(block_shape[1]))
        if min(block_shape) <= 0:
            raise ValueError(f"block_shape must be positive, got {block_shape}")
    E, R, C = w.shape
    device = w.device

    if dtype in (DType.BF16, DType.FP16):
        return QuantizedWeight(dtype, w.to(activation_dtype(dtype)).contiguous())

    if dtype is DType.FP8_W8A8:
        data = torch.empty((E, R, C), dtype=FP8_DTYPE, device=device)
        if per_channel:
            scale = torch.empty((E, R), dtype=torch.float32, device=device)
            for e in range(E):
                scale[e] = _fp8_scale(w[e].abs().amax(dim=1).float())
                data[e] = _to_fp8(w[e].float() / scale[e][:, None])
        elif block_shape is None:
            scale = torch.empty(E, dtype=torch.float32, device=device)
            for e in range(E):
                data[e], scale[e] = _quantize_fp8_tensor(w[e])
        else:
            bn, bk = block_shape
            scale = torch.empty((E, -(-R // bn), -(-C // bk)), dtype=torch.float32, device=device)
            for e in range(E):
                data[e], scale[e] = _quantize_fp8_blocks(w[e], block_shape)
        return QuantizedWeight(dtype, data, scale, block_shape=block_shape)

    if dtype is DType.INT8_W8A16:
        data = torch.empty((E, R, C), dtype=torch.int8, device=device)
        scale = torch.empty((E, R), dtype=torch.float32, device=device)
        for e in range(E):
            data[e], scale[e] = _quantize_int8_rows(w[e])
        return QuantizedWeight(dtype, data, scale)

    block = MXFP4_BLOCK if dtype is DType.MXFP4 else NVFP4_BLOCK
    if C % block:
        raise ValueError(f"{dtype.value} needs C (the GEMM's K) to be a multiple of {block}, got {C}")
    data = torch.empty((E, R, C // 2), dtype=torch.uint8, device=device)
    if dtype is DType.MXFP4:
        scale = torch.empty((E, R, C // block), dtype=torch.uint8, device=device)
        for e in range(E):
            data[e], scale[e] = quantize_mxfp4(w[e])
        return QuantizedWeight(dtype, data, scale)
    scale = torch.empty((E, R, C // block), dtype=FP8_DTYPE, device=device)
    global_scale = torch.empty(E, dtype=torch.float32, device=device)
    for e in range(E):
        data[e], scale[e], global_scale[e] = quantize_nvfp4(w[e])
    return QuantizedWeight(dtype, data, scale, global_scale)


def round_to_grid(w: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """fp32 ``[R, C]``: ``w [R, C]`` quantized to ``grid``'s format (its block shape, per-channel
    scales, group size) and dequantized, i.e. values a checkpoint in that format holds. C is
    zero-padded to whole scale groups first (zeros change no group's amax) and cropped after, so a
    per-GPU slice whose C is not a multiple of the group (gpt-oss-120b's down projection at TP4:
    720 columns, mxfp4 groups of 32) still gets one."""
    if w.dim() != 2:
        raise ValueError(f"round_to_grid takes one expert's [R, C], got shape {tuple(w.shape)}")
    C = w.shape[1]
    group = format_of(grid.dtype).scale_group
    if grid.dtype is DType.INT4_W4A16:
        group = (C + C % 2) if grid.int4_group == -1 else grid.int4_group
    padded = _pad_to_multiple(w.float(), (group,)) if group else w.float()
    quantized = quantize_weight(padded[None], grid.dtype, grid.block_shape, per_channel=grid.per_channel)
    return quantized.dequantize_expert(0)[:, :C]


# ---------------------------------------------------------------- fp8 (E4M3FN)

def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    """Saturating cast: some torch builds turn values beyond ±448 into NaN instead of clamping."""
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp_min(AMAX_FLOOR) / FP8_MAX


def _quantize_fp8_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _fp8_scale(w.abs().amax())
    return _to_fp8(w.float() / scale), scale


def _pad_to_multiple(x: torch.Tensor, multiples: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing dims of ``x`` up to multiples (zeros never change an amax)."""
    pad: list[int] = []
    for size, multiple in zip(reversed(x.shape[-len(multiples):]), reversed(multiples)):
        pad += [0, -size % multiple]
    return F.pad(x, pad) if any(pad) else x


def _quantize_fp8_blocks(w: torch.Tensor, block_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` → fp8 ``[R, C]`` and fp32 scales ``[ceil(R/bn), ceil(C/bk)]``."""
    bn, bk = block_shape
    R, C = w.shape
    padded = _pad_to_multiple(w.float(), (bn, bk))
    blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = _fp8_scale(blocks.abs().amax(dim=(1, 3)))
    data = _to_fp8(blocks / scale[:, None, :, None]).view(padded.shape)[:R, :C].contiguous()
    return data, scale


def _expand_block_scale(scale: torch.Tensor, block_shape: tuple[int, int], R: int, C: int) -> torch.Tensor:
    bn, bk = block_shape
    return scale.repeat_interleave(bn, dim=0)[:R].repeat_interleave(bk, dim=1)[:, :C]


def _dequantize_fp8_blocks(data: torch.Tensor, scale: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    R, C = data.shape
    return data.float() * _expand_block_scale(scale, block_shape, R, C)


def quantize_fp8_activation(x: torch.Tensor, group_k: int | None,
                            static_scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_w8a8 activation quantization, as the kernel consumes it; torch ops only, no host sync.

    ``x [T, C]``. Per-tensor (``group_k`` None): scale fp32 ``[1]``, dynamic amax/448 or the given
    ``static_scale``. Block (``group_k`` = the weight block's bk): scale fp32 ``[T, ceil(C/group_k)]``,
    one per token per K group (dynamic only, as in vLLM).
    """
    if x.dim() != 2:
        raise ValueError(f"activation must be [T, C], got shape {tuple(x.shape)}")
    if group_k is None:
        if static_scale is None:
            scale = _fp8_scale(x.abs().amax()).reshape(1)
        else:
            scale = torch.as_tensor(static_scale, dtype=torch.float32, device=x.device).reshape(1)
        return _to_fp8(x.float() / scale), scale
    if static_scale is not None:
        raise ValueError("a static activation scale applies to per-tensor fp8 only")
    if group_k <= 0:
        raise ValueError(f"group_k must be positive, got {group_k}")
    T, C = x.shape
    padded = _pad_to_multiple(x.float(), (group_k,))
    groups = padded.view(T, -1, group_k)
    scale = _fp8_scale(groups.abs().amax(dim=-1))
    data = _to_fp8(groups / scale[..., None]).view(T, -1)[:, :C].contiguous()
    return data, scale


def dequantize_fp8_activation(x_fp8: torch.Tensor, scale: torch.Tensor, group_k: int | None) -> torch.Tensor:
    """fp32 ``[T, C]`` from ``quantize_fp8_activation``'s output."""
    if group_k is None:
        return x_fp8.float() * scale
    return x_fp8.float() * scale.repeat_interleave(group_k, dim=1)[:, :x_fp8.shape[1]]


# ---------------------------------------------------------------- int8 (w8a16)

def _quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` → int8 ``[R, C]`` and fp32 scales ``[R]`` (symmetric, per output channel)."""
    scale = w.abs().amax(dim=1).float().clamp_min(AMAX_FLOOR) / INT8_MAX
    data = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return data, scale


# ---------------------------------------------------------------- E2M1 (fp4) codes

def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nibble codes (uint8, 0..15) of already-scaled values: nearest, ties to even, saturating at ±6."""
    magnitude = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint, tie_up in zip(_E2M1_MIDPOINTS, _E2M1_TIE_ROUNDS_UP):
        code += (magnitude >= midpoint) if tie_up else (magnitude > midpoint)
    return code | ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of nibble codes (uint8, 0..15)."""
    magnitudes = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    table = torch.cat([magnitudes, -magnitudes])
    return table[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` codes → ``[..., C/2]`` bytes, element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def _blocks(w: torch.Tensor, block: int, name: str) -> torch.Tensor:
    if w.shape[-1] % block:
        raise ValueError(f"{name} needs the last dim to be a multiple of {block}, got {w.shape[-1]}")
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // block, block)


# ---------------------------------------------------------------- mxfp4 (OCP MX, E8M0 scales)

def mxfp4_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The OCP MX shared exponent floor(log2(amax)) - 2, clamped to [-127, 127] (int32).

    Exact through frexp (amax = m·2^x with m in [0.5, 1), so floor(log2 amax) = x - 1); no log2
    rounding can move a block's max of exactly 6·2^e to the wrong exponent. amax = 0 gives -127.
    """
    _, exponent = torch.frexp(amax.float())
    shared = torch.where(amax > 0, exponent.int() - 3, torch.full_like(exponent.int(), -E8M0_BIAS))
    return shared.clamp(-E8M0_BIAS, E8M0_BIAS)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., C]`` (C % 32 == 0) → packed uint8 ``[..., C/2]`` and E8M0 scales uint8 ``[..., C/32]``."""
    blocks = _blocks(w, MXFP4_BLOCK, "mxfp4")
    amax = blocks.abs().amax(dim=-1)
    exponent = mxfp4_scale_exponent(amax)
    codes = encode_e2m1(torch.ldexp(blocks, -exponent[..., None].float()))
    scales = torch.where(torch.isfinite(amax), exponent + E8M0_BIAS, E8M0_NAN).to(torch.uint8)
    return pack_nibbles(codes.flatten(-2)), scales


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """fp32 2^(s - 127) for each uint8 scale; 0xFF is NaN."""
    value = torch.exp2(scales.float() - E8M0_BIAS)
    return torch.where(scales == E8M0_NAN, torch.full_like(value, math.nan), value)


def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed uint8 ``[..., C/2]`` and E8M0 scales ``[..., C/32]`` → ``[..., C]`` in ``dtype``."""
    values = decode_e2m1(unpack_nibbles(packed))
    blocks = values.reshape(*values.shape[:-1], -1, MXFP4_BLOCK) * e8m0_to_float(scales)[..., None]
    return blocks.flatten(-2).to(dtype)


# ---------------------------------------------------------------- nvfp4 (E4M3 block scales + fp32 global)

def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [..., R, C]`` (C % 16 == 0) → packed uint8 ``[..., R, C/2]``, E4M3 scales ``[..., R, C/16]``
    and fp32 global scales ``w.shape[:-2]`` (one per matrix, i.e. per expert)."""
    if w.dim() < 2:
        raise ValueError(f"nvfp4 quantizes matrices [..., R, C], got shape {tuple(w.shape)}")
    blocks = _blocks(w, NVFP4_BLOCK, "nvfp4")
    global_scale = blocks.abs().amax(dim=(-3, -2, -1)).clamp_min(AMAX_FLOOR) / (FP8_MAX * E2M1_MAX)
    global_per_block = global_scale[..., None, None]
    block_scale = _to_fp8(blocks.abs().amax(dim=-1) / E2M1_MAX / global_per_block)
    effective = block_scale.float() * global_per_block
    safe = torch.where(effective > 0, effective, torch.ones_like(effective))
    scaled = torch.where(effective[..., None] > 0, blocks / safe[..., None], torch.zeros_like(blocks))
    return pack_nibbles(encode_e2m1(scaled).flatten(-2)), block_scale, global_scale


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize_nvfp4``: value · E4M3 block scale · global scale, in ``dtype``."""
    values = decode_e2m1(unpack_nibbles(packed))
    block_scale = scales.float() * global_scale.float()[..., None, None]
    blocks = values.reshape(*values.shape[:-1], -1, NVFP4_BLOCK) * block_scale[..., None]
    return blocks.flatten(-2).to(dtype)


# ---------------------------------------------------------------- int4_w4a16 (symmetric, grouped along K)

def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, C]`` → packed uint8 ``[R, C/2]`` (nibble q + 8, element 2i low) and bf16 scales
    ``[R, C/group]``. C must be even and a multiple of ``group``."""
    R, C = w.shape
    if group < 2 or C % group or C % 2:
        raise ValueError(f"int4_w4a16 needs C (the GEMM's K) a multiple of the group size {group}, got {C}")
    groups = w.float().reshape(R, C // group, group)
    scale = (groups.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / INT4_LEVELS_HALF).to(torch.bfloat16)
    q = torch.round(groups / scale.float()[..., None]).clamp(-INT4_ZERO, INT4_ZERO - 1)
    codes = (q + INT4_ZERO).to(torch.uint8).reshape(R, C)
    return pack_nibbles(codes), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 ``[R, C]`` of packed int4 ``[R, C/2]`` with scales ``[R, C/group]``: (nibble - 8) · scale."""
    q = unpack_nibbles(packed).float() - INT4_ZERO
    return q * scale.float().repeat_interleave(group, dim=-1)[:, : q.shape[-1]]
