"""The grouped GEMM of the fused MoE: one Triton kernel for both GEMMs and every weight dtype.

``C[rows] = A[rows // top_k] @ B[expert]^T`` over the expert-sorted rows of ``workers.align``:
each program owns one BLOCK_SIZE_M × BLOCK_SIZE_N output tile, all of whose rows belong to one
expert. Config keys mean what they mean in vLLM's/SGLang's ``fused_moe_kernel`` (tile sizes,
GROUP_SIZE_M tile swizzle for L2 reuse, warps, pipeline stages), so tuned files transfer.

The grid is sized for the worst-case routing (static, so CUDA graphs can capture it); programs
whose tile starts past ``num_tokens_post_padded`` return at once.

Per weight dtype (the B operand, ``QuantizedWeight`` layouts):
- bf16/fp16: plain dot.
- fp8_w8a8 per tensor: fp8 × fp8 dot, times activation scale × the expert's weight scale at the end.
- fp8_w8a8 per channel: fp8 × fp8 dot, times the token's scale × the column's scale at the end
  (per-token dynamic activations; vLLM's ``per_channel_quant`` variant of its kernel).
- fp8_w8a8 block [bn, bk]: per K step, the dot times the token's K-group scale and the column's
  weight-block scale (so a K step must stay inside one bk group: bk % BLOCK_SIZE_K == 0, after
  the servers' launch clamp of BLOCK_SIZE_K to the block, ``workers.formats.launch_block_k``).
- int8_w8a16: int8 tile converted to the activation dtype, per-output-channel scale at the end.
- int4_w4a16: packed nibbles (two K rows per byte) minus 8, times the scale of their column and
  K group, converted to the activation dtype, then one dot (vLLM's/SGLang's GPTQ/AWQ kernel's
  arithmetic for checkpoints without zero points; any BLOCK_SIZE_K, as theirs).
- mxfp4 / nvfp4: packed nibbles decoded to bf16 and multiplied by their block scale (E8M0, resp.
  E4M3) inside the kernel, then one bf16 dot; nvfp4's per-expert fp32 global scale is applied
  to the fp32 accumulator at the end (the same product, one multiply per output instead of per
  weight, and no extra bf16 rounding).

Swapped operands (fp4 only, ``swap_ab``): the program computes the
transposed tile, ``acc[BLOCK_SIZE_N, BLOCK_SIZE_M] = W_tile @ A_tile^T``, so the decoded weight rows
fill the MMA's wide M side and the few tokens its narrow N side; config keys keep their meaning
(BLOCK_SIZE_M the token rows per tile, i.e. the sort's block; BLOCK_SIZE_N the weight rows). On
Hopper the dot becomes a wgmma with the weights as its register operand, but compiled for sm_90
(Triton 3.9) the loop issues more instructions per weight byte than the unswapped one (about
14.4 against 12.3 at BLOCK_SIZE_M 16, N 128, K 128, 4 warps): the packed bytes are staged
through shared memory and read back in 2-byte pieces in the wgmma operand layout, and the decode
(ALU), not the tensor cores, bounds the small-M kernel. So for row-major packed weights it is an
option, not the default.

The fp4 atom layout (``FP4_ATOMS``; ``workers.fp4_layout``, prepared once by the runner): the
weights as int32 words ordered so that each thread's share of the MMA's register operand is 16
contiguous bytes, 8 values per word with their bits interleaved so that masks and shifts put
each consecutive K pair into one bf16x2 register (``_atom_word_ptx``; the prepared scales carry
the decode's 2^126). Always swapped operands; the tile must cover whole atoms (BLOCK_SIZE_N % 16,
BLOCK_SIZE_K % 64). Compiled for sm_90 its K loop issues about 6.6 instructions per weight byte
at BLOCK_SIZE_M 16, N 128, K 128, 4 warps (``benchmarks/fp4_sass_count.py``), against 12.6 / 13.5
for the row-major layout in either order; the runner's default where the config allows.

Under Triton's interpreter bf16 arithmetic is wrong (see ``workers.interpreter``) and inline PTX
cannot run; the constexpr ``INTERPRETER``, set only when interpreting, routes bf16 through fp32
and decodes fp4 with plain Triton ops, at no cost on the GPU.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from workers.align import AlignedTokens
from workers.formats import format_of, launch_block_k, tile_rule_broken
from workers.fp4_layout import Fp4Atoms, fits_atoms, group_major
from workers.interpreter import dot, interpreting, round_to
from workers.quant import INT4_ZERO, QuantizedWeight
from workers.records import Config, DType

def validate_config(config: Config, dtype: DType, block_shape: tuple[int, int] | None = None) -> None:
    """Raise ValueError when ``config`` cannot run weights of ``dtype`` (the format's tile rules,
    ``workers.formats.tile_rule_broken``; as vLLM's tuner filters)."""
    broken = tile_rule_broken(config, dtype, block_shape)
    if broken is not None:
        raise ValueError(broken[1])


def check_config(config: Config, b: QuantizedWeight) -> None:
    """``validate_config`` for the weight ``b``."""
    validate_config(config, DType(b.dtype), b.block_shape)


def launch_layout(weight: QuantizedWeight) -> QuantizedWeight:
    """``weight`` with its fp4 block scales stored K-group-major: the same ``[E, R, C//group]``
    values, strides ``(R·G, 1, R)`` instead of ``(R·G, G, 1)`` (a copy of the scales, 1/32 resp.
    1/16 of the weight's elements; other dtypes are returned as they are).

    The kernel's scale tile is ``[BLOCK_SIZE_N, BLOCK_SIZE_K/group]`` bytes; row-major, each row's
    few bytes sit ``C//group`` bytes apart (90 for K = 2880: no aligned vector), which Triton loads
    one byte at a time and synchronously inside every K step (the pipeliner cannot make them
    asynchronous copies). K-group-major, each group's BLOCK_SIZE_N scales are contiguous, so they
    load as vectors and, from 4 groups per step on (BLOCK_SIZE_K 128 for mxfp4), the pipeliner
    copies them ahead with the packed weights (compiled for sm_90, Triton 3.9)."""
    if weight.dtype not in (DType.MXFP4, DType.NVFP4) or weight.scale is None:
        return weight
    return dataclasses.replace(weight, scale=group_major(weight.scale))


def launch_moe_gemm(a: torch.Tensor, a_scale: torch.Tensor | None, b: QuantizedWeight | Fp4Atoms, c: torch.Tensor,
                    aligned: AlignedTokens, topk_weights: torch.Tensor | None, *, top_k: int,
                    config: Config, interpreter: bool | None = None, swap_ab: bool = False) -> None:
    """``c[r] = a[r // top_k] @ b[expert(r)]^T`` (× ``topk_weights`` flat [r] when given) for sorted rows.

    ``a [T, K]`` (fp8 for fp8_w8a8, else the activation dtype), ``a_scale`` fp32 ``[1]`` or
    ``[T, ceil(K/bk)]`` for fp8, ``c [rows, R]`` with ``rows`` = the sort's sentinel. The one place
    that launches the kernel (compile-ahead hooks in here). ``interpreter`` defaults to
    "interpreting"; tests pass False to show what the switch guards against. ``swap_ab`` runs an fp4
    weight with swapped operands (module docstring; ValueError for another dtype). A ``b`` in the
    atom layout (``workers.fp4_layout.Fp4Atoms``) always runs swapped and needs a tile of whole
    atoms (``fits_atoms``; ValueError otherwise).
    """
    if config.BLOCK_SIZE_M != aligned.block_m:
        raise ValueError(f"config BLOCK_SIZE_M {config.BLOCK_SIZE_M} != sort block {aligned.block_m}")
    check_config(config, b)
    E, N, K = b.shape
    if a.shape[1] != K or c.shape[1] != N:
        raise ValueError(f"shapes disagree: a {tuple(a.shape)}, b {b.shape}, c {tuple(c.shape)}")
    dtype = b.dtype
    fp4 = dtype in (DType.MXFP4, DType.NVFP4)
    if swap_ab and not fp4:
        raise ValueError(f"swapped operands are an fp4 path, not {dtype.value}")
    block_quant = dtype is DType.FP8_W8A8 and b.block_shape is not None
    int4 = dtype is DType.INT4_W4A16
    group_n, group_k = b.block_shape if block_quant else (0, b.int4_group) if int4 else (0, 0)
    scale = b.scale if b.scale is not None else c  # never read when the dtype has no scale
    if dtype is DType.NVFP4:
        scale = scale.view(torch.uint8)  # the interpreter cannot fill masked fp8 lanes
    scale_strides = (scale.stride(0), scale.stride(1) if scale.dim() > 1 else 0,
                     scale.stride(2) if scale.dim() > 2 else 0)
    if dtype is DType.FP8_W8A8 and a_scale is None:
        raise ValueError("fp8_w8a8 needs the activation scale")
    a_scale_arg = a_scale if a_scale is not None else c
    a_scale_strides = (a_scale.stride(0), a_scale.stride(1)) if block_quant or b.per_channel else (0, 0)
    global_scale = b.global_scale if b.global_scale is not None else c
    weights = topk_weights if topk_weights is not None else c
    capacity = aligned.sorted_token_ids.shape[0]
    block_k = launch_block_k(config, dtype, b.block_shape)
    atoms = isinstance(b, Fp4Atoms)
    if atoms:
        if not fits_atoms(config.BLOCK_SIZE_N, block_k):
            raise ValueError(f"the fp4 atom layout needs BLOCK_SIZE_N % 16 == 0 and BLOCK_SIZE_K % 64 == 0, "
                             f"got {config.BLOCK_SIZE_N} and {block_k}")
        swap_ab = True
    if interpreter is None:
        interpreter = interpreting()

    grid = (triton.cdiv(capacity, config.BLOCK_SIZE_M) * triton.cdiv(N, config.BLOCK_SIZE_N),)
    _fused_moe_gemm_kernel[grid](
        a, b.data, c, a_scale_arg, scale, global_scale, weights,
        aligned.sorted_token_ids, aligned.expert_ids, aligned.num_tokens_post_padded,
        N, K, capacity, c.shape[0],
        a.stride(0), a.stride(1), b.data.stride(0), b.data.stride(1), b.data.stride(2),
        c.stride(0), c.stride(1), *a_scale_strides, *scale_strides, group_n, group_k,
        TOP_K=top_k, MUL_ROUTED_WEIGHT=topk_weights is not None,
        FP8_W8A8=dtype is DType.FP8_W8A8, FP8_BLOCK=block_quant, INT8_W8A16=dtype is DType.INT8_W8A16,
        FP4_GROUP=format_of(dtype).scale_group if fp4 else 0,
        INT4_W4A16=int4, INT4_ZERO=INT4_ZERO, FP8_CHANNEL=b.per_channel, FP4_ATOMS=atoms,
        EVEN_K=K % block_k == 0, SWAP_AB=swap_ab, INTERPRETER=bool(interpreter),
        COMPUTE_TYPE=tl.float16 if c.dtype == torch.float16 else tl.bfloat16,
        BLOCK_SIZE_M=config.BLOCK_SIZE_M, BLOCK_SIZE_N=config.BLOCK_SIZE_N,
        BLOCK_SIZE_K=block_k, GROUP_SIZE_M=config.GROUP_SIZE_M,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def _e2m1_ptx() -> str:
    """Inline PTX decoding the 4 packed bytes of ``$4`` with their bf16 scales (``$5``: bytes 0-1,
    ``$6``: bytes 2-3): low nibbles to ``$0`` (bytes 0-1) and ``$1`` (bytes 2-3), high nibbles
    to ``$2`` and ``$3``, two bf16 per register.

    PRMT puts two bytes into the high bytes of a register's two 16-bit halves (a free shift by
    8), so one sequence decodes two values at once and the high nibble's sign already sits on
    bf16's sign bit: its magnitude bits (exponent, mantissa) shift right by 6 to bf16 bits 8..6,
    the low nibble's by 2, its sign left by 4. The pattern reads as value·2^-126 (the code for
    0.5 as a subnormal); exact multiplies by 2^126 (0x7E80) and by the scale finish it (fma with
    -0.0 is a multiply that keeps signed zeros). Per byte (two weights) that is 6 instructions
    (PRMT 1/2, shifts 3/2, and-or 2, bf16x2 multiplies 2), down from 7.5 with the bytes spread
    to the low halves (two shifts per value). Only elementwise per byte, so correct in any
    register layout Triton gives the tile.
    """
    mask_sign, mask_mag = "0x80008000", "0x01C001C0"
    lines = ["{", ".reg .b32 bytes, mag, sign, two126, negzero;",
             "mov.b32 two126, 0x7E807E80;", "mov.b32 negzero, 0x80008000;"]
    for pair, selector in enumerate(("0x1404", "0x3424")):
        lines.append(f"prmt.b32 bytes, $4, 0, {selector};")
        # low nibble: sign from bit 11 of each half, magnitude from bits 10..8
        lines += ["shl.b32 sign, bytes, 4;", f"and.b32 sign, sign, {mask_sign};",
                  "shr.b32 mag, bytes, 2;", f"and.b32 mag, mag, {mask_mag};", "or.b32 mag, mag, sign;",
                  "fma.rn.bf16x2 mag, mag, two126, negzero;", f"fma.rn.bf16x2 ${pair}, mag, ${5 + pair}, negzero;"]
        # high nibble: sign already at bit 15, magnitude from bits 14..12
        lines += [f"and.b32 sign, bytes, {mask_sign};",
                  "shr.b32 mag, bytes, 6;", f"and.b32 mag, mag, {mask_mag};", "or.b32 mag, mag, sign;",
                  "fma.rn.bf16x2 mag, mag, two126, negzero;", f"fma.rn.bf16x2 ${pair + 2}, mag, ${5 + pair}, negzero;"]
    return "\n".join(lines + ["}"])


_E2M1_PTX = tl.constexpr(_e2m1_ptx())


def _atom_word_ptx() -> str:
    """Inline PTX decoding one 32-bit word of the atom layout (``$4``; 8 values, bit positions
    ``workers.fp4_layout.WORD_BITS``) with the bf16x2 scale words ``$5`` (outputs 0, 1) and ``$6``
    (outputs 2, 3) into ``$0..$3``, two bf16 each (e = 0 low half, e = 1 high half).

    Each output's bits land on bf16's sign and its exponent/mantissa bits 8..6 by one mask
    (output 0), a shift and a mask (1, 2) or three (3): the pattern reads as value·2^-126 (as in
    ``_e2m1_ptx``), and the atoms' scales carry the 2^126, so one multiply (fma with -0.0, which
    keeps signed zeros) finishes it. Per word 11 logic instructions and 4 bf16x2 multiplies: 3.75
    per byte.
    """
    mask = "0x81C081C0"
    lines = ["{", ".reg .b32 a, b, negzero;", "mov.b32 negzero, 0x80008000;",
             f"and.b32 $0, $4, {mask};",
             "shl.b32 a, $4, 3;", f"and.b32 $1, a, {mask};",
             "shl.b32 a, $4, 6;", f"and.b32 $2, a, {mask};",
             "shl.b32 a, $4, 1;", "and.b32 a, a, 0x80008000;",
             "shr.b32 b, $4, 4;", "and.b32 b, b, 0x00C000C0;", "or.b32 a, a, b;",
             "shr.b32 b, $4, 5;", "and.b32 b, b, 0x01000100;", "or.b32 $3, a, b;"]
    lines += [f"fma.rn.bf16x2 ${out}, ${out}, ${5 + out // 2}, negzero;" for out in range(4)]
    return "\n".join(lines + ["}"])


_ATOM_WORD_PTX = tl.constexpr(_atom_word_ptx())


@triton.jit
def _e2m1_to_bf16(codes):
    """E2M1 nibbles (int32 0..15: sign, 2 exponent bits, 1 mantissa bit) → exact bf16 values.

    A code with exponent e >= 1 and mantissa m is 2^(e-1)·(1 + m/2): bf16 exponent e + 126 and
    top mantissa bit m, i.e. bits (magnitude + 252) << 6. Code 1 is the subnormal 0.5, code 0 zero.
    """
    magnitude = codes & 7
    bits = tl.where(magnitude > 1, (magnitude + 252) << 6, tl.where(magnitude == 1, 0x3F00, 0))
    bits = bits | ((codes & 8) << 12)
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _e8m0_to_bf16(scales):
    """E8M0 scale bytes → bf16 2^(s-127): exponent field s; s = 0 is the subnormal 2^-127, 0xFF NaN."""
    s = scales.to(tl.int32)
    bits = tl.where(s == 0, 0x0040, tl.where(s == 255, 0x7FC0, s << 7))
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _decode_scaled_nibbles(packed, scales, INTERPRETER: tl.constexpr):
    """(low, high): the bf16 values of each byte's two nibbles times the byte's bf16 scale.

    Exact: an E2M1 value has 2 significant bits and a scale is a power of two (E8M0) or has 4
    (E4M3). Inline PTX on the GPU; the same arithmetic in Triton ops under the interpreter.
    """
    if INTERPRETER:
        codes = packed.to(tl.int32)
        scales = scales.to(tl.float32)
        low = (_e2m1_to_bf16(codes & 0xF).to(tl.float32) * scales).to(tl.bfloat16)
        high = (_e2m1_to_bf16(codes >> 4).to(tl.float32) * scales).to(tl.bfloat16)
        return low, high
    return tl.inline_asm_elementwise(_E2M1_PTX, "=r,=r,=r,=r,r,r,r", [packed, scales],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _dequantize_fp4_tile(packed, scales, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                         FP4_GROUP: tl.constexpr, INTERPRETER: tl.constexpr):
    """Packed ``[BN, BK/2]`` bytes and ``[BN, BK/FP4_GROUP]`` scales → bf16 ``[BN, BK]``.

    Viewed as ``[BN, groups, bytes per group]`` so each scale broadcasts over its own bytes; byte
    i holds element 2i in its low nibble, so joining the two decoded nibbles along a new minor
    axis puts them back in K order without moving data between threads.
    """
    GROUPS: tl.constexpr = BLOCK_SIZE_K // FP4_GROUP
    BYTES: tl.constexpr = FP4_GROUP // 2
    packed = tl.reshape(packed, (BLOCK_SIZE_N, GROUPS, BYTES))
    if FP4_GROUP == 32:
        block_scales = _e8m0_to_bf16(scales)
    else:
        block_scales = scales.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
    block_scales = tl.broadcast_to(block_scales[:, :, None], (BLOCK_SIZE_N, GROUPS, BYTES))
    low, high = _decode_scaled_nibbles(packed, block_scales, INTERPRETER)
    return tl.reshape(tl.join(low, high), (BLOCK_SIZE_N, BLOCK_SIZE_K))


@triton.jit
def _atom_word_patterns(words):
    """The interpreter's stand-in for ``_atom_word_ptx``'s bit work: the four bf16x2 patterns."""
    words = words.to(tl.uint32, bitcast=True)
    mask = 0x81C081C0
    out0 = words & mask
    out1 = (words << 3) & mask
    out2 = (words << 6) & mask
    out3 = ((words << 1) & 0x80008000) | ((words >> 4) & 0x00C000C0) | ((words >> 5) & 0x01000100)
    return out0, out1, out2, out3


@triton.jit
def _bf16x2_halves(pattern, scale, INTERPRETER: tl.constexpr):
    """A bf16x2 int32 ``pattern`` → bf16 values ``[..., 2]`` (low half first). Under the
    interpreter ``pattern`` is the undecoded bit pattern, read as fp32 (its bits 16 up: exact,
    subnormals included), times the fp32 ``scale``."""
    if INTERPRETER:
        low = ((pattern & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        high = (pattern & -65536).to(tl.float32, bitcast=True)
        low = (low * scale).to(tl.bfloat16)
        high = (high * scale).to(tl.bfloat16)
    else:
        low = (pattern & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        high = (pattern >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.join(low, high)


@triton.jit
def _dequantize_fp4_atoms(words, scales, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
                          FP4_GROUP: tl.constexpr, INTERPRETER: tl.constexpr):
    """Atom words ``[BN/16, BK/64, 128]`` int32 (``workers.fp4_layout``) and ``[BN, BK/FP4_GROUP]``
    scales → bf16 ``[BN, BK]``.

    The words are viewed as ``[i, j, g, q, r, h]`` (atom row block, atom K block, lane 4g + q,
    row half r, word h of the lane's two per row); a word decodes to values ``[e, p, c]`` at row
    16i + 8r + g, k 64j + 16(2h + c) + 8p + 2q + e. Only joins, one permute and reshapes bring them
    to ``[BN, BK]``: the layout the MMA's register operand wants is, traced back through them, each
    thread's 16 contiguous bytes, so the compiler loads them as one vector and decodes in place.
    The decode is elementwise per word, so correct in whatever layout the compiler picks.
    """
    C_N: tl.constexpr = 64 // FP4_GROUP  # scale groups per atom row
    words = tl.reshape(words, (BLOCK_SIZE_N // 16, BLOCK_SIZE_K // 64, 8, 4, 2, 2))
    # Each scale once, as a bf16x2 word (both halves the scale, which carries the decode's 2^126;
    # workers.fp4_layout): one multiply-add from the prepared byte.
    if FP4_GROUP == 32:  # byte t → 2^(t-1): exponent field t + 126
        scale_words = scales.to(tl.int32) * 0x00800080 + 0x3F003F00
    else:  # byte u → exponent field (u >> 3) + 235, mantissa u & 7
        scale_words = scales.to(tl.int32) * 0x00100010 + 0x75807580
    # [BN, BK/G] → [i, r, g, j, C] → [i, j, g, r, C] → per word h its chunks c = 0, 1
    scale_words = tl.reshape(scale_words, (BLOCK_SIZE_N // 16, 2, 8, BLOCK_SIZE_K // 64, C_N))
    scale_words = tl.permute(scale_words, (0, 3, 2, 1, 4))
    if FP4_GROUP == 32:  # one group per word
        scale0 = tl.reshape(scale_words, (BLOCK_SIZE_N // 16, BLOCK_SIZE_K // 64, 8, 1, 2, 2))
        scale1 = scale0
    else:  # chunk c of word h is group 2h + c
        scale0, scale1 = tl.split(tl.reshape(scale_words, (BLOCK_SIZE_N // 16, BLOCK_SIZE_K // 64, 8, 1, 2, 2, 2)))
    scale0 = tl.broadcast_to(scale0, (BLOCK_SIZE_N // 16, BLOCK_SIZE_K // 64, 8, 4, 2, 2))
    scale1 = tl.broadcast_to(scale1, (BLOCK_SIZE_N // 16, BLOCK_SIZE_K // 64, 8, 4, 2, 2))
    if INTERPRETER:
        out0, out1, out2, out3 = _atom_word_patterns(words)
        f0 = ((scale0 & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        f1 = ((scale1 & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        out0, out1, out2, out3 = (out0.to(tl.int32, bitcast=True), out1.to(tl.int32, bitcast=True),
                                  out2.to(tl.int32, bitcast=True), out3.to(tl.int32, bitcast=True))
    else:
        f0, f1 = 1.0, 1.0
        out0, out1, out2, out3 = tl.inline_asm_elementwise(
            _ATOM_WORD_PTX, "=r,=r,=r,=r,r,r,r", [words, scale0, scale1],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    # outputs (c, p) = (0, 0), (0, 1), (1, 0), (1, 1), each [.., e]
    chunk0 = tl.join(_bf16x2_halves(out0, f0, INTERPRETER), _bf16x2_halves(out1, f0, INTERPRETER))
    chunk1 = tl.join(_bf16x2_halves(out2, f1, INTERPRETER), _bf16x2_halves(out3, f1, INTERPRETER))
    values = tl.join(chunk0, chunk1)  # [i, j, g, q, r, h, e, p, c]
    values = tl.permute(values, (0, 4, 2, 1, 5, 8, 7, 3, 6))  # [i, r, g, j, h, c, p, q, e]
    return tl.reshape(values, (BLOCK_SIZE_N, BLOCK_SIZE_K))


# The row counts depend on the batch size: not specialized, so one compile serves every M.
@triton.jit(do_not_specialize=["EM", "num_valid_tokens"])
def _fused_moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, b_global_scale_ptr, topk_weights_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_valid_tokens,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, group_n, group_k,
    TOP_K: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    FP8_W8A8: tl.constexpr, FP8_BLOCK: tl.constexpr, INT8_W8A16: tl.constexpr, FP4_GROUP: tl.constexpr,
    INT4_W4A16: tl.constexpr, INT4_ZERO: tl.constexpr, FP8_CHANNEL: tl.constexpr, FP4_ATOMS: tl.constexpr,
    EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, INTERPRETER: tl.constexpr, COMPUTE_TYPE: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    # Grouped ordering: GROUP_SIZE_M consecutive M-tiles walk the N-tiles together, so the
    # weight tiles they share stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_SIZE_M >= num_tokens_post_padded:
        return

    offs_token_id = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
    offs_token = tl.load(sorted_token_ids_ptr + offs_token_id).to(tl.int64)
    token_mask = offs_token < num_valid_tokens
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    # Columns past N wrap around instead of being masked: the loads stay unmasked along N and
    # the wrapped columns are dropped by the store mask.
    offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)) % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (offs_token[:, None] // TOP_K * stride_am + offs_k[None, :] * stride_ak)
    b_expert_ptr = b_ptr + expert * stride_be
    num_k_steps = tl.cdiv(K, BLOCK_SIZE_K)
    if FP4_ATOMS:
        # Prepared atoms (workers.fp4_layout), int32 words: stride_bn steps a 16-row block,
        # stride_bk an atom (64 K values, 128 words); the scales are K-group-major
        # [E, rows padded to 16, groups].
        offs_i = (pid_n * (BLOCK_SIZE_N // 16) + tl.arange(0, BLOCK_SIZE_N // 16).to(tl.int64)) % tl.cdiv(N, 16)
        offs_j = tl.arange(0, BLOCK_SIZE_K // 64)
        b_ptrs = (b_expert_ptr + offs_i[:, None, None] * stride_bn + offs_j[None, :, None] * stride_bk
                  + tl.arange(0, 128)[None, None, :])
        offs_sn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)) % (tl.cdiv(N, 16) * 16)
        offs_group = tl.arange(0, BLOCK_SIZE_K // FP4_GROUP)
        b_scale_ptrs = (b_scale_ptr + expert * stride_bse + offs_sn[:, None] * stride_bsn
                        + offs_group[None, :] * stride_bsk)
    elif FP4_GROUP > 0:
        # Packed weights, read as [BN, BK/2] bytes with K contiguous.
        offs_kp = tl.arange(0, BLOCK_SIZE_K // 2)
        b_ptrs = b_expert_ptr + offs_bn[:, None] * stride_bn + offs_kp[None, :] * stride_bk
        offs_group = tl.arange(0, BLOCK_SIZE_K // FP4_GROUP)
        b_scale_ptrs = (b_scale_ptr + expert * stride_bse + offs_bn[:, None] * stride_bsn
                        + offs_group[None, :] * stride_bsk)
    elif INT4_W4A16:
        # Packed nibbles along K, read as [BK, BN] (two rows per byte row), as vLLM's and SGLang's
        # GPTQ/AWQ fused-MoE kernel reads them; a scale per column and group_k rows.
        b_ptrs = b_expert_ptr + (offs_k[:, None] // 2) * stride_bk + offs_bn[None, :] * stride_bn
        b_shift = (offs_k[:, None] % 2) * 4
        b_scale_ptrs = b_scale_ptr + expert * stride_bse + offs_bn[None, :] * stride_bsn
    else:
        b_ptrs = b_expert_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    if FP8_BLOCK:
        # Scale loads are too narrow for the pipeliner's asynchronous copies; each step's are
        # loaded one step ahead so their latency overlaps the previous step's dot.
        a_scale_ptrs = a_scale_ptr + offs_token // TOP_K * stride_asm
        b_scale_ptrs = b_scale_ptr + expert * stride_bse + (offs_bn // group_n) * stride_bsn
        a_scale = tl.load(a_scale_ptrs, mask=token_mask, other=0.0)
        b_scale = tl.load(b_scale_ptrs)

    if SWAP_AB:  # the transposed tile: weight rows along the MMA's M side
        accumulator = tl.zeros((BLOCK_SIZE_N, BLOCK_SIZE_M), dtype=tl.float32)
    else:
        accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k_step in range(0, num_k_steps):
        k_left = K - k_step * BLOCK_SIZE_K
        if EVEN_K:
            a = tl.load(a_ptrs, mask=token_mask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=token_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if FP4_GROUP > 0:  # packed E2M1 codes: in the atom layout (FP4_ATOMS) or row-major, 2 per byte
            if EVEN_K:
                packed = tl.load(b_ptrs)
                scales = tl.load(b_scale_ptrs)
            elif FP4_ATOMS:
                packed = tl.load(b_ptrs, mask=offs_j[None, :, None] < tl.cdiv(k_left, 64), other=0)
                scales = tl.load(b_scale_ptrs, mask=offs_group[None, :] < tl.cdiv(k_left, FP4_GROUP), other=0)
            else:
                packed = tl.load(b_ptrs, mask=offs_kp[None, :] < k_left // 2, other=0)
                scales = tl.load(b_scale_ptrs, mask=offs_group[None, :] < k_left // FP4_GROUP, other=0)
            if FP4_ATOMS:
                b = _dequantize_fp4_atoms(packed, scales, BLOCK_SIZE_N, BLOCK_SIZE_K, FP4_GROUP, INTERPRETER)
                b_ptrs += (BLOCK_SIZE_K // 64) * stride_bk
            else:
                b = _dequantize_fp4_tile(packed, scales, BLOCK_SIZE_N, BLOCK_SIZE_K, FP4_GROUP, INTERPRETER)
                b_ptrs += (BLOCK_SIZE_K // 2) * stride_bk
            b_scale_ptrs += (BLOCK_SIZE_K // FP4_GROUP) * stride_bsk
            if SWAP_AB:
                accumulator = dot(b, tl.trans(a), accumulator, INTERPRETER)
            else:
                accumulator = dot(a, tl.trans(b), accumulator, INTERPRETER)
        elif INT4_W4A16:
            groups = (k_step * BLOCK_SIZE_K + offs_k[:, None]) // group_k
            if EVEN_K:
                packed = tl.load(b_ptrs)
                scales = tl.load(b_scale_ptrs + groups * stride_bsk)
            else:
                packed = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
                scales = tl.load(b_scale_ptrs + groups * stride_bsk, mask=offs_k[:, None] < k_left, other=0.0)
            codes = ((packed >> b_shift) & 0xF).to(tl.int32) - INT4_ZERO
            b = codes.to(tl.float32) * scales.to(tl.float32)
            if not INTERPRETER:
                b = b.to(COMPUTE_TYPE)
            accumulator = dot(a, b, accumulator, INTERPRETER)
            b_ptrs += (BLOCK_SIZE_K // 2) * stride_bk
        else:
            if EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if INT8_W8A16:
                if INTERPRETER:
                    b = b.to(tl.float32)
                else:
                    b = b.to(COMPUTE_TYPE)
                accumulator = dot(a, b, accumulator, INTERPRETER)
            elif FP8_BLOCK:
                # After the last step this reloads the last group: in bounds, and never used.
                next_group = tl.minimum(((k_step + 1) * BLOCK_SIZE_K) // group_k, (K - 1) // group_k)
                next_a_scale = tl.load(a_scale_ptrs + next_group * stride_ask, mask=token_mask, other=0.0)
                next_b_scale = tl.load(b_scale_ptrs + next_group * stride_bsk)
                accumulator += tl.dot(a, b) * a_scale[:, None] * b_scale[None, :]
                a_scale, b_scale = next_a_scale, next_b_scale
            else:
                accumulator = dot(a, b, accumulator, INTERPRETER)
            b_ptrs += BLOCK_SIZE_K * stride_bk
        a_ptrs += BLOCK_SIZE_K * stride_ak

    if MUL_ROUTED_WEIGHT:
        routed_weight = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)
        if SWAP_AB:
            accumulator *= routed_weight[None, :]
        else:
            accumulator *= routed_weight[:, None]
    if FP8_CHANNEL:
        token_scale = tl.load(a_scale_ptr + offs_token // TOP_K * stride_asm, mask=token_mask, other=0.0)
        channel_scale = tl.load(b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn)
        accumulator *= token_scale[:, None] * channel_scale[None, :]
    elif FP8_W8A8 and not FP8_BLOCK:
        accumulator *= tl.load(a_scale_ptr) * tl.load(b_scale_ptr + expert)
    if INT8_W8A16:
        accumulator *= tl.load(b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn)[None, :]
    if FP4_GROUP == 16 or FP4_ATOMS:  # nvfp4's global scale; the atoms' exponent offset
        accumulator *= tl.load(b_global_scale_ptr + expert)

    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    if SWAP_AB:
        c_ptrs = c_ptr + offs_token[None, :] * stride_cm + offs_cn[:, None] * stride_cn
        c_mask = token_mask[None, :] & (offs_cn[:, None] < N)
    else:
        c_ptrs = c_ptr + offs_token[:, None] * stride_cm + offs_cn[None, :] * stride_cn
        c_mask = token_mask[:, None] & (offs_cn[None, :] < N)
    tl.store(c_ptrs, round_to(accumulator, COMPUTE_TYPE, INTERPRETER), mask=c_mask)
