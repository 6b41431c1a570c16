"""The fp4 kernel's inline-PTX E2M1 decode, executed by a small emulator of the PTX it uses.

The GPU decodes packed nibbles with inline PTX (``workers.fused_moe_kernel._e2m1_ptx``), which the
Triton interpreter cannot run (it takes the Triton-ops branch). So these tests execute the PTX
text itself, instruction by instruction (mov, prmt, shl, shr, and, or, fma.rn.bf16x2: the subset
it uses; anything else fails the test), on every byte value and a spread of scales, and compare
with ``workers.quant.decode_e2m1`` times the scale. Any edit of the PTX that changes a single
decoded value fails here before it reaches a GPU.
"""

from __future__ import annotations

import re

import pytest
import torch

from workers.fused_moe_kernel import _e2m1_ptx
from workers.quant import decode_e2m1

MASK32 = 0xFFFFFFFF


def _bf16_bits(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def _bf16_values(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float64)


def _prmt(a: torch.Tensor, b: torch.Tensor, selector: int) -> torch.Tensor:
    """PTX prmt.b32 default mode: result byte i is byte (selector nibble i & 7) of {b, a}, or that
    byte's sign replicated when the nibble's bit 3 is set."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = torch.zeros_like(a)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = pool[nibble & 7]
        if nibble & 8:
            byte = torch.where(byte & 0x80 != 0, 0xFF, 0)
        out |= byte << (8 * i)
    return out


def _fma_bf16x2(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fma.rn.bf16x2 per 16-bit half, rounded once to bf16 (the operands here are exact)."""
    out = torch.zeros_like(a)
    for shift in (0, 16):
        x, y, z = (_bf16_values((v >> shift) & 0xFFFF) for v in (a, b, c))
        out |= _bf16_bits(x * y + z) << shift
    return out


def run_ptx(ptx: str, operands: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Execute ``ptx`` on int64 tensors holding 32-bit registers (``$4``.. inputs); returns every register."""
    regs = dict(operands)

    def value(token: str) -> torch.Tensor:
        token = token.strip()
        if token in regs:
            return regs[token]
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", token):
            return torch.full_like(next(iter(operands.values())), int(token, 0))
        raise AssertionError(f"unknown operand {token!r}")

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dest, *srcs = [t.strip() for t in args.split(",")]
        if op == "mov.b32":
            result = value(srcs[0])
        elif op == "prmt.b32":
            result = _prmt(value(srcs[0]), value(srcs[1]), int(srcs[2], 0))
        elif op == "shl.b32":
            result = (value(srcs[0]) << int(srcs[1])) & MASK32
        elif op == "shr.b32":
            result = value(srcs[0]) >> int(srcs[1])
        elif op == "and.b32":
            result = value(srcs[0]) & value(srcs[1])
        elif op == "or.b32":
            result = value(srcs[0]) | value(srcs[1])
        elif op == "fma.rn.bf16x2":
            result = _fma_bf16x2(value(srcs[0]), value(srcs[1]), value(srcs[2]))
        else:
            raise AssertionError(f"the emulator does not know {op!r}: extend it with the new instruction")
        regs[dest] = result & MASK32
    return regs


def _decode_with_ptx(packed: torch.Tensor, scales: torch.Tensor, ptx: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) values of ``packed [n, 4]`` bytes with bf16 ``scales [n, 4]`` through the PTX
    (default: the kernel's)."""
    word = sum(packed[:, i].to(torch.int64) << (8 * i) for i in range(4))
    bits = _bf16_bits(scales)
    regs = run_ptx(ptx or _e2m1_ptx(), {"$4": word, "$5": bits[:, 0] | bits[:, 1] << 16,
                                 "$6": bits[:, 2] | bits[:, 3] << 16})
    low = torch.stack([_bf16_values((regs[f"${r}"] >> s) & 0xFFFF) for r in (0, 1) for s in (0, 16)], dim=1)
    high = torch.stack([_bf16_values((regs[f"${r}"] >> s) & 0xFFFF) for r in (2, 3) for s in (0, 16)], dim=1)
    return low, high


def _main_decode_ptx() -> str:
    from benchmarks.fp4_kernel_bench import MAIN_DECODE_PTX

    return MAIN_DECODE_PTX


@pytest.mark.parametrize("which", ["kernel", "benchmark's main baseline"])
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -127, 2.0 ** -20, 0.375, 448.0, 2.0 ** 120])
def test_every_byte_decodes_exactly(scale, which):
    """All 256 bytes in each of the 4 byte slots (so every PRMT selector is exercised), one scale;
    the kernel's decode and the old one ``benchmarks/fp4_kernel_bench.py`` times it against."""
    codes = torch.arange(256, dtype=torch.int64)
    packed = torch.stack([codes.roll(i) for i in range(4)], dim=1)
    scales = torch.full((256, 4), scale, dtype=torch.float64)
    low, high = _decode_with_ptx(packed, scales, None if which == "kernel" else _main_decode_ptx())
    expected_low = decode_e2m1(packed & 0xF).to(torch.float64) * scales.to(torch.bfloat16).to(torch.float64)
    expected_high = decode_e2m1(packed >> 4).to(torch.float64) * scales.to(torch.bfloat16).to(torch.float64)
    assert torch.equal(low, expected_low)
    assert torch.equal(high, expected_high)
    # signed zeros survive (code 8 is -0.0)
    assert torch.equal(torch.signbit(low), torch.signbit(expected_low))


def test_each_byte_takes_its_own_scale():
    """Bytes 0..3 read scales 0..3: the halves of $5 and $6 are not mixed up."""
    packed = torch.full((1, 4), 0x22, dtype=torch.int64)  # 1.0 in both nibbles
    scales = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    low, high = _decode_with_ptx(packed, scales)
    assert low.tolist() == high.tolist() == [[1.0, 2.0, 4.0, 8.0]]


def test_benchmark_main_variant_runs_the_old_decode(tmp_path):
    """The benchmark's ``main`` variant: a copy of workers.moe launching a kernel module copy whose
    decode is the old PTX; the product modules are left untouched."""
    import sys

    import workers.fused_moe_kernel as kernel
    import workers.moe as moe
    from benchmarks.fp4_kernel_bench import MAIN_DECODE_PTX, main_variant_moe

    copy = main_variant_moe(tmp_path)
    old_kernel = sys.modules["fp4_bench_main_kernel"]
    assert old_kernel._E2M1_PTX.value == MAIN_DECODE_PTX != kernel._E2M1_PTX.value
    assert copy.launch_moe_gemm is old_kernel.launch_moe_gemm
    assert moe.launch_moe_gemm is kernel.launch_moe_gemm



def _atom_words(codes: torch.Tensor) -> torch.Tensor:
    """int64 words of ``codes [n, 8]`` (value (c, p, e) at column 4c + 2p + e) placed at the
    layout's ``WORD_BITS``."""
    from workers.fp4_layout import WORD_BITS

    words = torch.zeros(codes.shape[0], dtype=torch.int64)
    for column in range(8):
        c, p, e = column >> 2, (column >> 1) & 1, column & 1
        for bit, position in zip((3, 2, 1, 0), WORD_BITS[2 * c + p]):
            words |= ((codes[:, column] >> bit) & 1) << (position + 16 * e)
    return words


def _decode_atom_words(codes: torch.Tensor, scale_words: tuple[int, int]) -> torch.Tensor:
    """Values ``[n, 8]`` (columns as ``_atom_words``) through the kernel's word PTX with the scale
    words ``$5`` (c = 0) and ``$6`` (c = 1)."""
    from workers.fused_moe_kernel import _atom_word_ptx

    words = _atom_words(codes)
    regs = run_ptx(_atom_word_ptx(), {"$4": words, "$5": torch.full_like(words, scale_words[0]),
                                      "$6": torch.full_like(words, scale_words[1])})
    return torch.stack([_bf16_values((regs[f"${(column >> 1)}"] >> (16 * (column & 1))) & 0xFFFF)
                        for column in range(8)], dim=1)


def _all_code_words() -> torch.Tensor:
    """Every code in every one of a word's 8 slots, the other slots random."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16 * 8 * 4, 8), generator=generator)
    for slot in range(8):
        codes[slot * 64:(slot + 1) * 64, slot] = torch.arange(64) % 16
    return codes


def _check_words(scale_words: tuple[int, int], scales: tuple[float, float]) -> None:
    codes = _all_code_words()
    values = _decode_atom_words(codes, scale_words)
    expected = decode_e2m1(codes).to(torch.float64) * torch.tensor([scales[0]] * 4 + [scales[1]] * 4,
                                                                    dtype=torch.float64)
    assert torch.equal(values, expected)
    assert torch.equal(torch.signbit(values), torch.signbit(expected))  # signed zeros kept


@pytest.mark.parametrize("t", [0, 1, 100, 127, 128])
def test_atom_words_mxfp4(t):
    """mxfp4 atoms: the scale word the kernel makes from prepared byte t (t·0x00800080 +
    0x3F003F00: bf16 2^(t-1) = 2^(t-127)·2^126) gives every value times 2^(t-127) exactly;
    outputs 2 and 3 read the second scale."""
    other = max(t - 1, 0)
    _check_words((t * 0x00800080 + 0x3F003F00, other * 0x00800080 + 0x3F003F00),
                 (2.0 ** (t - 127), 2.0 ** (other - 127)))


@pytest.mark.parametrize("scale, other", [(2.0 ** -9, 0.375), (1.0, 448.0), (448.0, 2.0 ** -7)])
def test_atom_words_nvfp4(scale, other):
    """nvfp4 atoms: prepared byte u of the E4M3 scale (``_nvfp4_scale_bytes``) → the kernel's word
    u·0x00100010 + 0x75807580 gives every value times scale·2^-9 exactly (the global scale
    carries the 2^9)."""
    from workers.fp4_layout import NVFP4_SHIFT, _nvfp4_scale_bytes

    e4m3 = torch.tensor([scale, other]).to(torch.float8_e4m3fn)
    assert e4m3.float().tolist() == [scale, other]
    u = _nvfp4_scale_bytes(e4m3).to(torch.int64).tolist()
    _check_words(tuple(v * 0x00100010 + 0x75807580 for v in u),
                 (scale * 2.0 ** -NVFP4_SHIFT, other * 2.0 ** -NVFP4_SHIFT))


def test_nvfp4_scale_bytes_cover_every_positive_e4m3():
    from workers.fp4_layout import NVFP4_SHIFT, _nvfp4_scale_bytes

    e4m3 = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)  # every positive finite
    u = _nvfp4_scale_bytes(e4m3).to(torch.int32)
    decoded = (u * 16 + 0x7580).to(torch.int16).view(torch.bfloat16).double()
    assert torch.equal(decoded, e4m3.double() * 2.0 ** (126 - NVFP4_SHIFT))


def test_the_kernel_launches_this_word_decode():
    import workers.fused_moe_kernel as kernel

    assert kernel._ATOM_WORD_PTX.value == kernel._atom_word_ptx()
