"""Benchmark problems: repeatable, weights shared across batch sizes, well-scaled; rel_error; bounds."""

from __future__ import annotations

import math

import pytest
import torch

from workers.problem import ERROR_BOUNDS, build_problem, rel_error, release_weights
from workers.quant import activation_dtype
from workers.records import DType, MoEShape
from workers.reference import reference_moe

@pytest.mark.parametrize("dtype,block_shape", [(DType.BF16, None), (DType.FP16, None), (DType.FP8_W8A8, None),
                                               (DType.FP8_W8A8, (32, 64)), (DType.INT8_W8A16, None),
                                               (DType.MXFP4, None), (DType.NVFP4, None)])
def test_problem_inputs_and_reference(seed: int, dtype: DType, block_shape) -> None:
    shape = MoEShape(E=6, N=96, K=128, topk=2, dtype=dtype, block_shape=block_shape)
    problem = build_problem(shape, 33, routing="zipf:1.0", seed=seed)
    assert problem.x.shape == (33, 128) and problem.x.dtype == activation_dtype(dtype)
    assert problem.w13.shape == (6, 192, 128) and problem.w2.shape == (6, 128, 96)
    assert problem.w13.dtype is dtype and problem.w13.block_shape == block_shape
    assert problem.topk_ids.shape == (33, 2) and problem.topk_ids.dtype == torch.int32
    assert problem.reference.shape == (33, 128) and problem.reference.dtype == torch.float32
    assert torch.equal(problem.reference,
                       reference_moe(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids))
    assert 0.2 < problem.reference.std().item() < 2.0  # O(1) whatever the shape


def test_problem_is_repeatable_and_weights_are_built_once_per_shape(seed: int) -> None:
    shape = MoEShape(E=4, N=32, K=64, topk=2, dtype=DType.FP8_W8A8)
    first = build_problem(shape, 7, seed=seed)
    other_m = build_problem(shape, 9, seed=seed)
    assert other_m.w13 is first.w13 and other_m.w2 is first.w2
    release_weights()
    again = build_problem(shape, 7, seed=seed)
    assert again.w13 is not first.w13
    for name in ("x", "topk_weights", "topk_ids", "reference"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert torch.equal(first.w13.data.view(torch.uint8), again.w13.data.view(torch.uint8))
    different = build_problem(shape, 7, seed=seed + 1)
    assert not torch.equal(first.x, different.x) and not torch.equal(first.w13.scale, different.w13.scale)


def test_build_problem_rejects_bad_input() -> None:
    shape = MoEShape(E=4, N=32, K=64, topk=2, dtype=DType.BF16)
    with pytest.raises(ValueError):
        build_problem(shape, 0)
    with pytest.raises(ValueError):
        build_problem(shape, 4, routing="zipf:-2")


def test_rel_error() -> None:
    ref = torch.tensor([[3.0, 4.0]])
    assert rel_error(torch.tensor([[3.0, 4.5]]), ref) == pytest.approx(0.1)
    assert rel_error(torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16), ref) == 0.0
    assert rel_error(torch.tensor([[math.nan, 4.0]]), ref) == math.inf
    assert rel_error(torch.tensor([[3.0, math.inf]]), ref) == math.inf
    assert rel_error(torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0
    assert rel_error(torch.ones(1, 2), torch.zeros(1, 2)) == math.inf


def test_every_dtype_has_a_bound_that_quantization_error_would_break() -> None:
    """A kernel that ignored the quantization (used the unquantized weights) must fail the bound."""
    assert set(ERROR_BOUNDS) == set(DType)
    for dtype in (DType.FP8_W8A8, DType.MXFP4, DType.NVFP4):
        shape = MoEShape(E=4, N=64, K=128, topk=2, dtype=dtype)
        quantized = build_problem(shape, 16)
        unquantized = build_problem(MoEShape(E=4, N=64, K=128, topk=2, dtype=DType.BF16), 16)
        assert rel_error(unquantized.reference, quantized.reference) > ERROR_BOUNDS[dtype], dtype
