"""Byte, FLOP and memory arithmetic of one fused-MoE call, and the GPU peaks to set it against.

A measured latency means little alone: the report states how close it is to the two floors
(moving the touched weights through HBM; doing the multiply-adds on the tensor cores), and how
many tokens fit next to the weights. All numbers are per GPU and per MoE call (both GEMMs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.records import DType, MoEShape

ACTIVATION_BYTES = 2  # activations are bf16 (fp16 for fp16) for every dtype, see the kernel semantics
ROUTING_BYTES_PER_CHOICE = 12  # fp32 weight + int32 expert id + int32 sorted token id


@dataclass(frozen=True)
class DevicePeaks:
    """Datasheet peaks (dense, no sparsity) of one GPU model; ``name_contains`` matches
    ``torch.cuda.get_device_name()``."""

    name_contains: str
    hbm_bytes_per_s: float
    bf16_flops: float
    fp8_flops: float | None
    memory_bytes: int


# Ordered so that the more specific names match first ("H100 PCIe" before "H100").
KNOWN_DEVICES: tuple[DevicePeaks, ...] = (
    DevicePeaks("H100 PCIe", 2.0e12, 756e12, 1513e12, 80 * 2**30),
    DevicePeaks("H100 NVL", 3.9e12, 835e12, 1671e12, 94 * 2**30),
    DevicePeaks("H100", 3.35e12, 989e12, 1979e12, 80 * 2**30),
    DevicePeaks("H200", 4.8e12, 989e12, 1979e12, 141 * 2**30),
    DevicePeaks("B200", 8.0e12, 2250e12, 4500e12, 180 * 2**30),
    DevicePeaks("A100-SXM4-80GB", 2.039e12, 312e12, None, 80 * 2**30),
    DevicePeaks("A100", 1.555e12, 312e12, None, 40 * 2**30),
)


def device_peaks(device_name: str) -> DevicePeaks | None:
    """The peaks of a GPU by its reported name; None for unknown devices (and CPU runs)."""
    for peaks in KNOWN_DEVICES:
        if peaks.name_contains.lower() in device_name.lower():
            return peaks
    return None


def _weight_bytes_one(shape: MoEShape, rows: int, cols: int) -> int:
    """Bytes of one stacked ``[E, rows, cols]`` weight including its scales (layout of workers.quant)."""
    E, elements = shape.E, shape.E * rows * cols
    dtype = shape.dtype
    if dtype in (DType.BF16, DType.FP16):
        return 2 * elements
    if dtype is DType.FP8_W8A8:
        if shape.block_shape is None:
            return elements + 4 * E
        bn, bk = shape.block_shape
        return elements + 4 * E * math.ceil(rows / bn) * math.ceil(cols / bk)
    if dtype is DType.INT8_W8A16:
        return elements + 4 * E * rows
    if dtype is DType.MXFP4:
        return elements // 2 + elements // 32
    if dtype is DType.NVFP4:
        return elements // 2 + elements // 16 + 4 * E
    raise ValueError(f"unknown dtype {dtype}")


def weight_bytes(shape: MoEShape) -> int:
    """Bytes of one MoE layer's expert weights on one GPU: w13 ``[E, 2N, K]`` plus w2 ``[E, K, N]``."""
    return _weight_bytes_one(shape, 2 * shape.N, shape.K) + _weight_bytes_one(shape, shape.K, shape.N)


def working_bytes_per_token(shape: MoEShape) -> int:
    """Buffers one token needs during a fused-MoE call (allocated per call, reused across layers).

    Input row and output row; per routed expert the up-GEMM output (2N), the SwiGLU output (N) and
    the down-GEMM output before the top-k sum (K); the routing tensors; for fp8_w8a8 also the
    quantized copies of the input and of the SwiGLU output with their scales.
    """
    K, N, topk = shape.K, shape.N, shape.topk
    per_token = ACTIVATION_BYTES * (2 * K + topk * (2 * N + N + K)) + ROUTING_BYTES_PER_CHOICE * topk
    if shape.dtype is DType.FP8_W8A8:
        group = shape.block_shape[1] if shape.block_shape else None
        scales_in = 4 * (math.ceil(K / group) if group else 0)
        scales_mid = 4 * (math.ceil(N / group) if group else 0)
        per_token += K + scales_in + topk * (N + scales_mid)
    return per_token


def expected_experts_touched(E: int, topk: int, M: int) -> float:
    """Distinct experts that M tokens with uniform top-k routing reach on average."""
    return E * (1.0 - (1.0 - topk / E) ** M)


def min_bytes_moved(shape: MoEShape, M: int, experts_touched: float) -> float:
    """The HBM floor's bytes: every touched expert's weights once, the input read, the output written."""
    return weight_bytes(shape) * experts_touched / shape.E + 2 * ACTIVATION_BYTES * M * shape.K


def flops(shape: MoEShape, M: int) -> float:
    """Multiply-adds of both GEMMs, counted as 2 FLOPs: up ``2N x K`` and down ``K x N`` per routed token."""
    return 2.0 * M * shape.topk * (2 * shape.N * shape.K + shape.K * shape.N)


def peak_flops(peaks: DevicePeaks, dtype: DType) -> float:
    """Tensor-core peak the kernel can use: fp8 x fp8 for fp8_w8a8; every other dtype's dot
    runs in bf16/fp16 (int8 and fp4 weights are dequantized into the tile first)."""
    if dtype is DType.FP8_W8A8 and peaks.fp8_flops is not None:
        return peaks.fp8_flops
    return peaks.bf16_flops


@dataclass(frozen=True)
class FloorFractions:
    """Floor time over measured time: 1.0 means the kernel runs at that peak."""

    hbm: float
    compute: float

    @property
    def regime(self) -> str:
        return "memory-bound" if self.hbm >= self.compute else "compute-bound"


def floor_fractions(shape: MoEShape, M: int, latency_us: float, peaks: DevicePeaks,
                    experts_touched: float) -> FloorFractions:
    seconds = latency_us * 1e-6
    hbm_s = min_bytes_moved(shape, M, experts_touched) / peaks.hbm_bytes_per_s
    compute_s = flops(shape, M) / peak_flops(peaks, shape.dtype)
    return FloorFractions(hbm=hbm_s / seconds, compute=compute_s / seconds)


def max_batch_in_budget(weights_total: int, per_token: int, budget_bytes: int) -> int:
    """Largest M with ``weights_total + M * per_token <= budget_bytes`` (0 when the weights alone
    do not fit)."""
    return max(0, (budget_bytes - weights_total) // per_token)
