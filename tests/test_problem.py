"""Benchmark problems: repeatable, weights shared across batch sizes, well-scaled; rel_error; bounds."""

from __future__ import annotations

import math

import pytest
import torch

from workers.problem import ERROR_BOUNDS, build_problem, rel_error, release_weights
from workers.quant import activation_dtype, round_to_grid
from workers.records import DType, MoEShape, WeightGrid
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


GRIDS = [WeightGrid(DType.MXFP4), WeightGrid(DType.NVFP4), WeightGrid(DType.FP8_W8A8),
         WeightGrid(DType.FP8_W8A8, (32, 32)), WeightGrid(DType.FP8_W8A8, per_channel=True),
         WeightGrid(DType.INT4_W4A16, (0, 32))]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.label)
def test_weights_on_a_checkpoint_grid_carry_no_error_of_the_checkpoint_s_own_format(seed: int, grid) -> None:
    """compare on a quantized checkpoint (gpt-oss: mxfp4): every dtype's master weights lie on the
    checkpoint's grid. bf16 runs them dequantized, the checkpoint's own format holds exactly them
    (up to the bf16 rounding of the dequantized values), every other format re-quantizes them; on
    random bf16 weights the 4-bit formats are 13-23% away from bf16."""
    def shape_of(dtype: DType) -> MoEShape:
        own = dtype is grid.dtype
        block = grid.block_shape if own else ((0, 32) if dtype is DType.INT4_W4A16 else None)
        return MoEShape(E=3, N=96, K=64, topk=2, dtype=dtype, block_shape=block, per_channel=own and grid.per_channel)

    bf16 = build_problem(shape_of(DType.BF16), 5, seed=seed, grid=grid)
    own = build_problem(shape_of(grid.dtype), 5, seed=seed, grid=grid)
    for name in ("w13", "w2"):
        master, checkpoint = getattr(bf16, name).dequantize(), getattr(own, name).dequantize()
        assert torch.equal(master, checkpoint.to(torch.bfloat16).float()), name  # bf16 = the checkpoint dequantized
    assert torch.equal(bf16.x, own.x) and torch.equal(bf16.topk_ids, own.topk_ids)
    plain = build_problem(shape_of(grid.dtype), 5, seed=seed)
    plain_bf16 = build_problem(shape_of(DType.BF16), 5, seed=seed)
    if grid.dtype in (DType.MXFP4, DType.NVFP4, DType.INT4_W4A16):
        assert rel_error(reference_moe(plain_bf16.x, plain.w13, plain.w2, plain.topk_weights, plain.topk_ids),
                         plain_bf16.reference) > 0.05
    other = DType.MXFP4 if grid.dtype is not DType.MXFP4 else DType.INT4_W4A16
    requantized = build_problem(shape_of(other), 5, seed=seed, grid=grid)
    assert rel_error(reference_moe(bf16.x, requantized.w13, requantized.w2, bf16.topk_weights, bf16.topk_ids),
                     bf16.reference) > 0.05  # another 4-bit format still pays its own quantization
    # A per-GPU slice that is not a whole number of scale groups (gpt-oss TP4's 720 columns) still
    # lies on the grid: its last group is zero-padded.
    ragged = build_problem(MoEShape(E=3, N=80, K=64, topk=2, dtype=DType.BF16), 5, seed=seed, grid=grid)
    w2 = ragged.w2.dequantize()[0]
    again = round_to_grid(w2, grid).to(torch.bfloat16).float()
    if grid.dtype is DType.MXFP4:  # E2M1 · 2^k: exact in bf16, and MX re-quantization finds the same scales
        assert torch.equal(again, w2)
    else:  # re-quantizing moves scales a little (fp8 amax of bf16-rounded values, int4's amax/7.5, ...)
        assert rel_error(again, w2) < 0.1


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
