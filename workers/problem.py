"""One benchmark problem: random weights, inputs and routing for a shape and batch size, and the
fp32 reference output every kernel run is checked against.

Pass bounds (``ERROR_BOUNDS``, relative Frobenius error of the kernel's output against
``reference_moe``, which uses the dequantized weights and, for fp8_w8a8, emulates the activation
quantization). "Seen" is our kernel under the Triton interpreter at E=4, N,K in 64..96, M in
{1, 7, 33} (2026-11-22); the margin covers tiny-shape scatter and GPU accumulation order.

- bf16 2e-2 (seen 3.7e-3..5.0e-3): bf16 storage of gate/up, SwiGLU output and output; vLLM's
  kernel measured 4.3e-3 on real shapes.
- fp16 2e-2 (seen 4.2e-4..5.0e-4): the same with 3 more mantissa bits.
- fp8_w8a8 3e-2 (seen 2.2e-3..2.5e-3, per-tensor and block): the fp8 roundings are emulated
  exactly, so what is left is bf16 storage. A kernel rounding the intermediate unlike vLLM would
  see ~1.5e-2, up to ~6.5e-2 at tiny shapes (see ``workers.reference``).
- int8_w8a16 3e-2 (seen 3.2e-3..4.2e-3): bf16 activations times exactly dequantized weights.
- int4_w4a16 3e-2: as int8_w8a16 ((q - 8) · bf16 scale is exact in fp32; the kernel rounds it to
  bf16 once, as the servers' kernel does).
- mxfp4 3e-2 (seen 3.6e-3..3.8e-3): as int8_w8a16 (E2M1 · 2^k is exact in bf16).
- nvfp4 3e-2 (seen 3.8e-3..4.1e-3): as int8_w8a16, plus bf16 rounding of value · E4M3 scale ·
  global scale.

A wrong kernel (a skipped K tile, a wrong scale index, an unwritten row) is off by 0.1 or more.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from workers.quant import QuantizedWeight, activation_dtype, quantize_weight, round_to_grid
from workers.records import DType, MoEShape, WeightGrid
from workers.reference import reference_moe
from workers.routing import make_routing

ERROR_BOUNDS: dict[DType, float] = {
    DType.BF16: 2e-2,
    DType.FP16: 2e-2,
    DType.FP8_W8A8: 3e-2,
    DType.INT8_W8A16: 3e-2,
    DType.INT4_W4A16: 3e-2,
    DType.MXFP4: 3e-2,
    DType.NVFP4: 3e-2,
}


@dataclass
class Problem:
    """Inputs of one fused-MoE call and its reference output (fp32 ``[M, K]``)."""

    shape: MoEShape
    M: int
    routing: str
    x: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    w13: QuantizedWeight
    w2: QuantizedWeight
    reference: torch.Tensor


def build_problem(shape: MoEShape, M: int, *, routing: str = "uniform", seed: int = 0,
                  device: torch.device | str = "cpu", activation: str | None = None,
                  grid: WeightGrid | None = None) -> Problem:
    """Random problem for ``shape`` at batch size ``M``; repeatable for equal arguments.

    x ~ N(0, 1), w13 ~ N(0, 1/K), w2 ~ N(0, 1/N), so every GEMM output is O(1) whatever the shape.
    The weights depend only on (shape, seed, device, grid) and are kept for the next call, so a
    sweep over batch sizes builds them once. ``activation``: the reference's
    (``workers.reference``; None: the experts' own, silu when ``shape.gated``, relu² when not).
    ``grid``: a quantized checkpoint's format (``compare``): the master weights are rounded to it
    once (``workers.quant.round_to_grid``) before ``shape.dtype`` quantizes them, so every dtype
    runs the checkpoint as deployed (bf16: its dequantized weights) and the checkpoint's own
    dtype carries no quantization error of its own (mxfp4 and block fp8 re-quantize exactly).
    """
    if M < 1:
        raise ValueError(f"batch size must be >= 1, got {M}")
    device = torch.device(device)
    w13, w2 = _expert_weights(shape, seed, device, grid)
    generator = torch.Generator(device=device).manual_seed(_derive_seed(seed, "inputs", M))
    x = torch.randn((M, shape.K), generator=generator, device=device).to(activation_dtype(shape.dtype))
    routing_generator = torch.Generator().manual_seed(_derive_seed(seed, "routing", M))
    topk_weights, topk_ids = make_routing(routing, M, shape.E, shape.topk, routing_generator, device,
                                          ep=shape.ep, fused_shared=shape.fused_shared)
    reference = reference_moe(x, w13, w2, topk_weights, topk_ids, activation)
    return Problem(shape, M, routing, x, topk_weights, topk_ids, w13, w2, reference)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in fp32; inf if ``out`` holds any NaN or inf (e.g. unwritten NaN fill)."""
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    diff = torch.linalg.vector_norm(out - ref.float()).item()
    norm = torch.linalg.vector_norm(ref.float()).item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def release_weights() -> None:
    """Drop the cached weights (they hold GPU memory until the next shape replaces them)."""
    _weight_cache.clear()


_weight_cache: dict[tuple, tuple[QuantizedWeight, QuantizedWeight]] = {}


def _expert_weights(shape: MoEShape, seed: int, device: torch.device,
                    grid: WeightGrid | None) -> tuple[QuantizedWeight, QuantizedWeight]:
    key = (shape, seed, str(device), grid)
    if key not in _weight_cache:
        _weight_cache.clear()  # free the previous shape's weights before allocating these
        generator = torch.Generator(device=device).manual_seed(_derive_seed(seed, "weights"))
        w13 = _random_weight((shape.E, shape.up_rows, shape.K), shape.K ** -0.5, shape, generator, grid)
        w2 = _random_weight((shape.E, shape.K, shape.N), shape.N ** -0.5, shape, generator, grid)
        _weight_cache[key] = (w13, w2)
    return _weight_cache[key]


def _random_weight(size: tuple[int, int, int], std: float, shape: MoEShape, generator: torch.Generator,
                   grid: WeightGrid | None) -> QuantizedWeight:
    """N(0, std²) (rounded to ``grid`` when given) in the activation dtype, drawn one expert at a
    time (fp32 temporaries of one expert)."""
    E, R, C = size
    if grid is not None and grid == WeightGrid(shape.dtype, shape.block_shape, shape.per_channel):
        # The checkpoint's own format: quantized from the draw itself, as the checkpoint was (a
        # quantizer need not be idempotent: int4_w4a16's amax/7.5 scale moves on a second pass).
        experts = [quantize_weight((torch.randn((R, C), generator=generator, device=generator.device) * std)[None],
                                   shape.dtype, shape.block_shape, per_channel=shape.per_channel) for _ in range(E)]
        first = experts[0]
        return QuantizedWeight(first.dtype, torch.cat([q.data for q in experts]),
                               None if first.scale is None else torch.cat([q.scale for q in experts]),
                               None if first.global_scale is None else torch.cat([q.global_scale for q in experts]),
                               first.block_shape)
    weight = torch.empty(size, dtype=activation_dtype(shape.dtype), device=generator.device)
    for expert in range(E):
        drawn = torch.randn((R, C), generator=generator, device=generator.device) * std
        weight[expert] = drawn if grid is None else round_to_grid(drawn, grid)
    return quantize_weight(weight, shape.dtype, shape.block_shape, per_channel=shape.per_channel)


def _derive_seed(seed: int, *parts: object) -> int:
    """Independent, platform-stable seeds for each random stream of a problem."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
