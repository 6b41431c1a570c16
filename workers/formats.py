"""Facts about each weight/activation format, defined once: bits per element, weight scales, the
tensor-core path, and the tile rules a format imposes on a config.

Read by the kernel's config validation (``workers.fused_moe_kernel``), the model loader's shape
checks (``tuner.models``), search-space pruning (``tuner.spaces``), the cost model
(``tuner.cost_model``) and the roofline (``tuner.roofline``). Standard library only (besides
``workers.records``), so the torch-free ``moe-tune plan`` imports it. Adding a format is one
entry in ``FORMATS`` (plus its quantizer and kernel path).

Layouts as ``workers.quant`` stores them (and as vLLM's/SGLang's fused-MoE kernels read them):
fp8_w8a8 one fp32 scale per expert, or per ``[block_n, block_k]`` weight block with a block
shape; int8_w8a16 one fp32 scale per output channel; mxfp4 (OCP MX) one E8M0 byte per 32
weights along K; nvfp4 one E4M3 byte per 16 weights along K plus one fp32 global scale per expert;
int4_w4a16 one bf16 scale per output channel and checkpoint group along K (``block_shape [0, group]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.records import Config, DType

MIN_TILE = 16
"""Smallest BLOCK_SIZE_M/N/K ``tl.dot`` takes."""
FP32_SCALE_BYTES = 4
BF16_SCALE_BYTES = 2


@dataclass(frozen=True)
class WeightScales:
    """Bytes of weight scales, per stacked ``[E, rows, cols]`` weight (cols is the GEMM's K)."""

    per_expert: int = 0
    """Bytes per expert (a per-tensor scale; nvfp4's global scale). Not used with a block shape."""
    per_row: int = 0
    """Bytes per output channel and expert."""
    group_k: int | None = None
    """Weights along K sharing one scale byte (fp4 formats); a K tile must hold whole groups."""
    per_block: int = 0
    """Bytes per ``[block_n, block_k]`` weight block, when the shape has a block shape."""
    per_shape_group: int = 0
    """Bytes per scale group along K whose size the shape names as ``block_shape = [0, group]``
    (int4_w4a16; a group of -1 is the whole row)."""


@dataclass(frozen=True)
class Format:
    dtype: DType
    activation_bits: int
    """Bits per activation element the GEMMs read (8: quantized to fp8 on the fly)."""
    weight_bits: int
    """Bits per stored weight element (4: packed nibbles)."""
    scales: WeightScales = field(default_factory=WeightScales)
    fp8_dot: bool = False
    """The dot runs on fp8 tensor cores (otherwise bf16/fp16: int8 and fp4 weights are
    dequantized into the tile first)."""
    block_shapes: bool = False
    """Takes a ``[block_n, block_k]`` weight block shape."""
    staged_weight_bits: int | None = None
    """Bits per weight the kernel stages in shared memory when not ``weight_bits`` (int4_w4a16: a
    ``[BK, BN]`` tile of bytes, each byte loaded for both of its K rows, as the servers' kernel)."""

    @property
    def tile_weight_bits(self) -> int:
        return self.staged_weight_bits or self.weight_bits

    @property
    def scale_group(self) -> int | None:
        return self.scales.group_k

    def weight_bytes(self, experts: int, rows: int, cols: int, block_shape: tuple[int, int] | None = None) -> int:
        """Bytes of one stacked ``[experts, rows, cols]`` weight including its scales."""
        elements = experts * rows * cols
        total = elements * self.weight_bits // 8 + self.scales.per_row * experts * rows
        if block_shape is not None and self.block_shapes:
            bn, bk = block_shape
            total += self.scales.per_block * experts * -(-rows // bn) * -(-cols // bk)
        else:
            total += self.scales.per_expert * experts
        if self.scales.per_shape_group and block_shape is not None:
            group = cols if block_shape[1] == -1 else block_shape[1]
            total += self.scales.per_shape_group * experts * rows * -(-cols // group)
        if self.scales.group_k:
            total += elements // self.scales.group_k
        return total


FORMATS: dict[DType, Format] = {
    DType.BF16: Format(DType.BF16, 16, 16),
    DType.FP16: Format(DType.FP16, 16, 16),
    DType.FP8_W8A8: Format(DType.FP8_W8A8, 8, 8, WeightScales(per_expert=FP32_SCALE_BYTES, per_block=FP32_SCALE_BYTES),
                           fp8_dot=True, block_shapes=True),
    DType.INT8_W8A16: Format(DType.INT8_W8A16, 16, 8, WeightScales(per_row=FP32_SCALE_BYTES)),
    DType.MXFP4: Format(DType.MXFP4, 16, 4, WeightScales(group_k=32)),
    DType.NVFP4: Format(DType.NVFP4, 16, 4, WeightScales(per_expert=FP32_SCALE_BYTES, group_k=16)),
    DType.INT4_W4A16: Format(DType.INT4_W4A16, 16, 4, WeightScales(per_shape_group=BF16_SCALE_BYTES),
                             staged_weight_bits=8),
}


def format_of(dtype: DType) -> Format:
    return FORMATS[DType(dtype)]


def block_shape_dtypes() -> list[str]:
    """The dtypes that take a ``[block_n, block_k]`` weight block shape."""
    return [fmt.dtype.value for fmt in FORMATS.values() if fmt.block_shapes]


def block_shape_broken(block: Sequence[int]) -> str | None:
    """Why ``block`` cannot be a weight block shape ``[block_n, block_k]`` (block-quantized fp8),
    or None: two multiples of ``MIN_TILE``, since a kernel tile (a power of two, at least 16 for
    ``tl.dot``) must divide it. The one rule ``--block-shape``, a job spec's ``block_shape`` and a
    checkpoint's ``weight_block_size`` are held to."""
    values = list(block)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values) \
            or min(values) < MIN_TILE or any(v % MIN_TILE for v in values):
        return f"expected [block_n, block_k], two multiples of {MIN_TILE} (e.g. 128,128), got {values}"
    return None


def shape_rule_broken(dtype: DType, N: int, K: int) -> str | None:
    """Why one GPU's ``N`` and ``K`` cannot hold weights of ``dtype`` (fp4 formats: both GEMMs
    reduce over whole scale groups, so K and N are multiples of the group), or None."""
    group = format_of(dtype).scale_group
    if group and (K % group or N % group):
        return f"{DType(dtype).value} needs K and N multiples of {group} (K={K}, N={N})"
    return None


TILE_RULES = ("tile_min", "tile_pow2", "block_quant", "fp4_group")
"""The tile rules formats impose, by name (``tile_rule_broken``)."""


def launch_block_k(config: Config, dtype: DType, block_shape: tuple[int, int] | None) -> int:
    """The BLOCK_SIZE_K the servers launch ``config`` with: with a block shape vLLM clamps it to the
    block's smaller side (``min(BLOCK_SIZE_K, min(block_shape))``, vLLM 0.33's
    ``invoke_fused_moe_triton_kernel``), so a file's 256 runs as 128 with block [128, 128]."""
    if format_of(dtype).block_shapes and block_shape is not None:
        return min(config.BLOCK_SIZE_K, min(block_shape))
    return config.BLOCK_SIZE_K


def tile_rule_broken(config: Config, dtype: DType, block_shape: tuple[int, int] | None = None) -> tuple[str, str] | None:
    """The first tile rule ``config`` breaks for weights of ``dtype`` as the servers launch it (name
    from ``TILE_RULES``, and why), or None. Breaking one gives wrong results or no kernel, not a
    slow one:

    - tile_min: every tile side >= ``MIN_TILE`` (``tl.dot``).
    - tile_pow2: every tile side a power of two (``tl.arange``).
    - block_quant: with an fp8 block shape the kernel reads one activation scale per K step, so a
      K step (after the launch clamp, ``launch_block_k``) sits inside one group: block_k %
      BLOCK_SIZE_K == 0. Weight scales are read per column, so any BLOCK_SIZE_N runs (vLLM's
      tuner searches BLOCK_SIZE_N/K 256 with block [128, 128]).
    - fp4_group: a K tile holding part of a scale group cannot be dequantized, so
      BLOCK_SIZE_K % group == 0.
    """
    fmt = format_of(dtype)
    block_k_launched = launch_block_k(config, dtype, block_shape)
    if min(config.BLOCK_SIZE_M, config.BLOCK_SIZE_N, block_k_launched) < MIN_TILE:
        return "tile_min", f"tile sizes must be >= {MIN_TILE} (tl.dot), got {config.label}"
    if any(v & (v - 1) for v in (config.BLOCK_SIZE_M, config.BLOCK_SIZE_N, config.BLOCK_SIZE_K)):
        return "tile_pow2", f"tile sizes must be powers of two (tl.arange), got {config.label}"
    if fmt.block_shapes and block_shape is not None:
        if block_shape[1] % block_k_launched:
            return "block_quant", (f"block {fmt.dtype.value} {list(block_shape)} needs block_k % BLOCK_SIZE_K == 0 "
                                   f"(after the servers' clamp to {min(block_shape)}), got {config.label}")
    group = fmt.scale_group
    if group and config.BLOCK_SIZE_K % group:
        return "fp4_group", f"{fmt.dtype.value} needs BLOCK_SIZE_K % {group} == 0, got {config.label}"
    return None
