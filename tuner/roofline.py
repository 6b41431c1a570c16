"""Byte, FLOP and memory arithmetic of one fused-MoE call, and the GPU peaks to set it against.

A measured latency means little alone: the report states how close it is to the two floors
(moving the touched weights through HBM; doing the multiply-adds on the tensor cores), and how
many tokens fit next to the weights. All numbers are per GPU and per MoE call (both GEMMs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuner.devices import DeviceFacts, device_facts
from workers.formats import FP32_SCALE_BYTES, format_of
from workers.records import DType, MoEShape

ACTIVATION_BYTES = 2  # activations are bf16 (fp16 for fp16) for every dtype, see the kernel semantics
ROUTING_BYTES_PER_CHOICE = 12  # fp32 weight + int32 expert id + int32 sorted token id


def device_peaks(device_name: str) -> DeviceFacts | None:
    """The facts of a GPU whose peaks are known (``tuner.devices``); None otherwise (and on CPU runs)."""
    facts = device_facts(device_name)
    return facts if facts is not None and facts.has_peaks else None


def weight_bytes(shape: MoEShape) -> int:
    """Bytes of one MoE layer's expert weights on one GPU, scales included (``workers.formats``):
    w13 ``[E, 2N, K]`` (``[E, N, K]`` for non-gated experts) plus w2 ``[E, K, N]``."""
    fmt = format_of(shape.dtype)
    return (fmt.weight_bytes(shape.E, shape.up_rows, shape.K, shape.block_shape)
            + fmt.weight_bytes(shape.E, shape.K, shape.N, shape.block_shape))


def working_bytes_per_token(shape: MoEShape) -> int:
    """Buffers one token needs during a fused-MoE call (allocated per call, reused across layers).

    Input row and output row; per routed expert the up-GEMM output (2N), the SwiGLU output (N) and
    the down-GEMM output before the top-k sum (K); the routing tensors; for a format with quantized
    activations (fp8_w8a8) also the quantized copies of the input and of the SwiGLU output with
    their scales (one fp32 per block_k group with a block shape).
    """
    K, N, topk = shape.K, shape.N, shape.pairs_per_token
    per_token = ACTIVATION_BYTES * (2 * K + topk * (shape.up_rows + N + K)) + ROUTING_BYTES_PER_CHOICE * topk
    quantized_bytes = format_of(shape.dtype).activation_bits // 8
    if quantized_bytes < ACTIVATION_BYTES:
        group = shape.block_shape[1] if shape.block_shape else None
        scales_in = FP32_SCALE_BYTES * (math.ceil(K / group) if group else 0)
        scales_mid = FP32_SCALE_BYTES * (math.ceil(N / group) if group else 0)
        per_token += quantized_bytes * K + scales_in + topk * (quantized_bytes * N + scales_mid)
    return per_token


def min_bytes_moved(shape: MoEShape, M: int, experts_touched: float) -> float:
    """The HBM floor's bytes: every touched expert's weights once, the input read, the output written."""
    return weight_bytes(shape) * experts_touched / shape.E + 2 * ACTIVATION_BYTES * M * shape.K


def flops(shape: MoEShape, M: int) -> float:
    """Multiply-adds of both GEMMs, counted as 2 FLOPs: up ``2N x K`` and down ``K x N`` per routed token."""
    return 2.0 * M * shape.pairs_per_token * (shape.up_rows * shape.K + shape.K * shape.N)


def peak_flops(peaks: DeviceFacts, dtype: DType) -> float:
    """Tensor-core peak the kernel can use: fp8 x fp8 where the format's dot runs on fp8 tensor
    cores; every other dot runs in bf16/fp16 (int8 and fp4 weights are dequantized first)."""
    if format_of(dtype).fp8_dot and peaks.fp8_flops is not None:
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


def floor_fractions(shape: MoEShape, M: int, latency_us: float, peaks: DeviceFacts,
                    experts_touched: float) -> FloorFractions:
    seconds = latency_us * 1e-6
    hbm_s = min_bytes_moved(shape, M, experts_touched) / peaks.hbm_bytes_per_s
    compute_s = flops(shape, M) / peak_flops(peaks, shape.dtype)
    return FloorFractions(hbm=hbm_s / seconds, compute=compute_s / seconds)


def max_batch_in_budget(weights_total: int, per_token: int, budget_bytes: int) -> int:
    """Largest M with ``weights_total + M * per_token <= budget_bytes`` (0 when the weights alone
    do not fit)."""
    return max(0, (budget_bytes - weights_total) // per_token)
