"""reference_moe against a naive dense computation (a full weight gather, affordable only at tiny shapes)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from workers.quant import activation_dtype, dequantize_fp8_activation, quantize_fp8_activation, quantize_weight
from workers.records import DType
from workers.reference import RELU2, SILU, SWIGLU_OAI, activate, reference_moe

FORMATS = [
    (DType.BF16, None), (DType.FP16, None), (DType.FP8_W8A8, None), (DType.FP8_W8A8, (32, 32)),
    (DType.INT8_W8A16, None), (DType.MXFP4, None), (DType.NVFP4, None),
]


@pytest.fixture
def gen(generator: torch.Generator) -> torch.Generator:
    return generator


def _fp8_round_trip(a: torch.Tensor, group_k: int | None) -> torch.Tensor:
    return dequantize_fp8_activation(*quantize_fp8_activation(a, group_k), group_k)


def naive_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Every (token, slot) pair with its own gathered expert weights: [M, topk, 2N, K] at once."""
    N = w13.shape[1] // 2
    fp8 = w13.dtype is DType.FP8_W8A8
    group_k = w13.block_shape[1] if fp8 and w13.block_shape else None
    a = _fp8_round_trip(x, group_k) if fp8 else x.float()
    ids = topk_ids.long()
    gate_up = torch.einsum("mk,mjrk->mjr", a, w13.dequantize()[ids])
    if fp8:  # the kernel stores gate/up and the SwiGLU output in the activation dtype
        gate_up = gate_up.to(x.dtype).float()
    h = F.silu(gate_up[..., :N]) * gate_up[..., N:]
    if fp8:
        M, topk, _ = h.shape
        h = _fp8_round_trip(h.to(x.dtype).reshape(M * topk, N), group_k).reshape(M, topk, N)
    down = torch.einsum("mjn,mjkn->mjk", h, w2.dequantize()[ids])
    return (down * topk_weights[..., None]).sum(dim=1)


def _routing(gen: torch.Generator, M: int, experts_used: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits, ids = torch.rand(M, experts_used, generator=gen).topk(topk, dim=1)
    return torch.softmax(logits, dim=1), ids.to(torch.int32)


@pytest.mark.parametrize("dtype,block_shape", FORMATS)
@pytest.mark.parametrize("M,topk", [(1, 1), (13, 2), (40, 3)])
def test_reference_matches_naive_dense(gen: torch.Generator, dtype: DType, block_shape, M: int, topk: int) -> None:
    E, N, K = 5, 64, 96
    x = torch.randn(M, K, generator=gen).to(activation_dtype(dtype))
    w13 = quantize_weight(torch.randn(E, 2 * N, K, generator=gen) / K**0.5, dtype, block_shape)
    w2 = quantize_weight(torch.randn(E, K, N, generator=gen) / N**0.5, dtype, block_shape)
    # Experts 3 and 4 get no tokens.
    topk_weights, topk_ids = _routing(gen, M, 3, topk)
    out = reference_moe(x, w13, w2, topk_weights, topk_ids)
    expected = naive_moe(x, w13, w2, topk_weights, topk_ids)
    assert out.dtype == torch.float32 and out.shape == (M, K)
    _assert_matches(out, expected, fp8=dtype is DType.FP8_W8A8)


def _assert_matches(out: torch.Tensor, expected: torch.Tensor, fp8: bool) -> None:
    """Tight agreement, except that fp8 rounds twice on the way (gate/up to the activation dtype,
    then SwiGLU to fp8): a 1e-7 difference in summation order can flip one rounding, which moves
    that token's row by part of one E4M3 step (1/8 relative, of one of its N terms). Over 3000
    seeds at M=40 such flips hit at most 2 rows, by at most 2.1%; allow one row in ten, by at most
    1/16. A wrong expert or weight moves most rows, by far more."""
    close = torch.isclose(out, expected, rtol=1e-4, atol=1e-5).all(dim=1)
    if not fp8:
        assert close.all(), f"rows {(~close).nonzero().flatten().tolist()} differ"
        return
    flipped = (~close).nonzero().flatten()
    assert len(flipped) <= max(1, len(out) // 10), f"rows {flipped.tolist()} differ"
    step = (out[flipped] - expected[flipped]).norm(dim=1) / expected[flipped].norm(dim=1)
    assert (step <= 1 / 16).all(), f"relative row error {step.tolist()}"


def test_reference_hand_computed_single_expert() -> None:
    # One token, one expert, identity-like weights: gate = x, up = 2x, out = 0.5 · W2 @ (silu(x) · 2x).
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0]], dtype=torch.bfloat16)
    eye = torch.eye(4)  # K = N = 4
    w13 = quantize_weight(torch.cat([eye, 2 * eye])[None], DType.BF16)
    w2 = quantize_weight(3 * eye[None], DType.BF16)
    out = reference_moe(x, w13, w2, torch.tensor([[0.5]]), torch.tensor([[0]], dtype=torch.int32))
    xf = x.float()
    assert torch.allclose(out, 0.5 * 3 * F.silu(xf) * 2 * xf)


def test_reference_rejects_mismatched_inputs(gen: torch.Generator) -> None:
    w13 = quantize_weight(torch.randn(2, 64, 32, generator=gen), DType.BF16)
    w2 = quantize_weight(torch.randn(2, 32, 32, generator=gen), DType.BF16)
    x = torch.randn(3, 32, generator=gen).bfloat16()
    weights, ids = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="shapes disagree"):
        reference_moe(x[:, :16], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="routing shapes"):
        reference_moe(x, w13, w2, weights[:2], ids[:2])
    with pytest.raises(ValueError, match="expert >= E"):
        reference_moe(x, w13, w2, weights, ids + 2)
    with pytest.raises(ValueError, match="share dtype"):
        reference_moe(x, w13, quantize_weight(torch.randn(2, 32, 32, generator=gen), DType.FP8_W8A8), weights, ids)


def test_one_activation_mechanism_for_gated_and_non_gated_experts() -> None:
    """``activation`` picks among silu, gpt-oss's SwiGLU and relu² (non-gated experts); None means
    the experts' own, read off the weights, and one that does not fit the weights is refused."""
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.bfloat16)
    eye = torch.eye(4)
    weights, ids = torch.tensor([[1.0]]), torch.tensor([[0]], dtype=torch.int32)
    w2 = quantize_weight(eye[None], DType.BF16)
    up_only = quantize_weight(2 * eye[None], DType.BF16)  # non-gated: w13 [E, N, K]
    xf = x.float()
    relu2 = F.relu(2 * xf).square()
    assert torch.allclose(reference_moe(x, up_only, w2, weights, ids), relu2)
    assert torch.allclose(reference_moe(x, up_only, w2, weights, ids, RELU2), relu2)
    gated = quantize_weight(torch.cat([eye, 2 * eye])[None], DType.BF16)
    assert torch.allclose(reference_moe(x, gated, w2, weights, ids), reference_moe(x, gated, w2, weights, ids, SILU))
    assert torch.allclose(reference_moe(x, gated, w2, weights, ids, SWIGLU_OAI), activate(xf, 2 * xf, SWIGLU_OAI))
    for weights13, wrong in ((up_only, SILU), (up_only, SWIGLU_OAI), (gated, RELU2)):
        with pytest.raises(ValueError, match="does not fit"):
            reference_moe(x, weights13, w2, weights, ids, wrong)
