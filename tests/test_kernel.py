"""The fused-MoE kernel under the Triton interpreter, every dtype against ``reference_moe``.

Tiny shapes chosen to hit the edge cases: K and N not multiples of the tile sizes, fewer routed
rows than BLOCK_SIZE_M, experts with no tokens, top-1, and a down GEMM tiled with another
BLOCK_SIZE_M than the up GEMM. Every buffer the kernels write starts as NaN (or, in the sort, as a
row index the GEMM masks out), so an unwritten element fails the error check.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

import pytest
import torch

from workers.activation import swiglu, swiglu_fp8_groups
from workers.align import TokenAligner
from workers.fp8_activation import fp8_absmax, fp8_quantize_per_group, fp8_quantize_per_tensor
from workers.fused_moe_kernel import check_config, launch_layout, launch_moe_gemm
from workers.moe import MoERunner
from workers.problem import rel_error
from workers.quant import FP8_DTYPE, QuantizedWeight, activation_dtype, quantize_fp8_activation, quantize_weight
from workers.records import Config, DType
from workers.reference import reference_moe

# Explicit bounds, about 2.5x what each dtype measures here (the product bounds in
# workers.problem.ERROR_BOUNDS are looser, for real shapes and every routing).
BOUNDS = {
    DType.BF16: 1e-2,        # measures ~4e-3: bf16 intermediate and output
    DType.FP16: 2e-3,        # ~5e-4
    DType.FP8_W8A8: 1e-2,    # ~2.5e-3 (the reference emulates the activation quantization)
    DType.INT8_W8A16: 1e-2,  # ~4e-3
    DType.MXFP4: 1e-2,       # ~4e-3
    DType.NVFP4: 1e-2,       # ~4e-3
}
SMALL = Config(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=2)


def make_problem(M, E, N, K, topk, dtype, generator, block_shape=None, experts_used=None):
    """Random inputs (x ~ N(0,1), weights scaled so outputs are O(1)) and distinct experts per token."""
    x = torch.randn((M, K), generator=generator).to(activation_dtype(dtype))
    w13 = quantize_weight(torch.randn((E, 2 * N, K), generator=generator) * K ** -0.5, dtype, block_shape)
    w2 = quantize_weight(torch.randn((E, K, N), generator=generator) * N ** -0.5, dtype, block_shape)
    pool = experts_used or E
    topk_ids = torch.stack([torch.randperm(pool, generator=generator)[:topk] for _ in range(M)]).to(torch.int32)
    topk_weights = torch.rand((M, topk), generator=generator).softmax(dim=-1)
    return x, w13, w2, topk_weights, topk_ids


def run_checked(problem, config, down_config=None, fp4_swap=False, fp4_atoms=True) -> float:
    runner = MoERunner(*problem, config, down_config, fp4_swap=fp4_swap, fp4_atoms=fp4_atoms)
    runner.poison_buffers()
    out = runner.run()
    return rel_error(out, reference_moe(*problem))


@pytest.mark.parametrize("dtype, block_shape, N, K", [
    (DType.BF16, None, 48, 80),
    (DType.FP16, None, 48, 80),
    (DType.FP8_W8A8, None, 48, 80),
    (DType.FP8_W8A8, (32, 32), 48, 80),  # block scales, partial blocks at the N and K edges
    (DType.INT8_W8A16, None, 48, 80),
    (DType.MXFP4, None, 64, 96),         # fp4 needs K and N multiples of the scale group
    (DType.NVFP4, None, 48, 80),
])
def test_every_dtype_matches_reference(dtype, block_shape, N, K, generator):
    problem = make_problem(12, 4, N, K, 2, dtype, generator, block_shape)
    assert run_checked(problem, SMALL) < BOUNDS[dtype]


@pytest.mark.parametrize("dtype, M, topk, N, K, config", [
    (DType.MXFP4, 1, 2, 64, 96, SMALL),                       # one token: a tile row of 16 is 1 real row
    (DType.MXFP4, 3, 2, 64, 96, Config(16, 64, 64, 1, 4, 2)),  # K 96 = 1.5 K tiles, N 64 = one N tile
    (DType.NVFP4, 12, 2, 48, 80, SMALL),                      # N 48 = 1.5 N tiles, K 80 = 2.5 K tiles
    (DType.NVFP4, 20, 1, 48, 80, Config(32, 16, 16, 1, 4, 2)),  # top-1: the down GEMM writes the output
])
def test_fp4_swapped_operands_match_reference(dtype, M, topk, N, K, config, generator):
    """The transposed tile (weights on the MMA's M side) on the row-major layout (``fp4_atoms=False``:
    a config of whole atoms would otherwise run the atom path both ways): both GEMMs, routed weights
    applied along the token axis, partial N and K tiles, tiny M; the same result as the unswapped kernel."""
    problem = make_problem(M, 4, N, K, topk, dtype, generator)
    assert run_checked(problem, config, fp4_swap=True, fp4_atoms=False) < BOUNDS[dtype]
    swapped = MoERunner(*problem, config, fp4_swap=True, fp4_atoms=False)
    plain = MoERunner(*problem, config, fp4_atoms=False)
    assert isinstance(swapped.w13, QuantizedWeight) and isinstance(plain.w13, QuantizedWeight)
    swapped, plain = swapped.run(), plain.run()
    assert rel_error(swapped, plain.float()) < 1e-2


@pytest.mark.parametrize("dtype", [DType.MXFP4, DType.NVFP4])
def test_fp4_scales_launch_k_group_major_with_the_same_result(dtype, generator):
    """launch_layout keeps the scale values and changes only their strides; the GEMM reads them
    through the strides, so both layouts give the same output bit for bit."""
    x, w13, _, _, topk_ids = make_problem(5, 2, 64, 96, 1, dtype, generator)
    laid = launch_layout(w13)
    E, R, G = w13.scale.shape
    assert torch.equal(laid.scale.view(torch.uint8), w13.scale.view(torch.uint8))
    assert laid.scale.stride() == (R * G, 1, R) and laid.data is w13.data
    sort = TokenAligner(5, 2, SMALL.BLOCK_SIZE_M, "cpu").run(topk_ids)
    outputs = []
    for weight in (w13, laid):
        out = torch.full((5, 2 * 64), float("nan"), dtype=torch.bfloat16)
        launch_moe_gemm(x, None, weight, out, sort, None, top_k=1, config=Config(16, 32, 64, 1, 4, 2))
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1]) and bool(torch.isfinite(outputs[0]).all())
    assert launch_layout(make_problem(1, 2, 32, 64, 1, DType.BF16, generator)[1]).scale is None


def test_swapped_operands_are_an_fp4_path(generator):
    x, w13, _, _, topk_ids = make_problem(4, 2, 32, 64, 1, DType.BF16, generator)
    sort = TokenAligner(4, 2, SMALL.BLOCK_SIZE_M, "cpu").run(topk_ids)
    out = torch.empty((4, 64), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp4 path, not bf16"):
        launch_moe_gemm(x, None, w13, out, sort, None, top_k=1, config=SMALL, swap_ab=True)


@pytest.mark.parametrize("M, topk, experts_used", [
    (3, 2, None),  # 6 routed rows < BLOCK_SIZE_M, two of four experts idle
    (9, 1, 2),     # top-1, experts 2 and 3 get nothing
])
def test_small_and_sparse_routing(M, topk, experts_used, generator):
    problem = make_problem(M, 4, 48, 80, topk, DType.BF16, generator, experts_used=experts_used)
    assert run_checked(problem, SMALL) < BOUNDS[DType.BF16]


def test_down_gemm_with_its_own_tiles(generator):
    """SGLang tunes the GEMMs apart: a down config with another BLOCK_SIZE_M gets its own sort."""
    problem = make_problem(20, 4, 48, 80, 2, DType.FP16, generator)
    down = Config(BLOCK_SIZE_M=32, BLOCK_SIZE_N=16, BLOCK_SIZE_K=64, GROUP_SIZE_M=2, num_warps=4, num_stages=2)
    assert run_checked(problem, SMALL, down) < BOUNDS[DType.FP16]


def test_split_parts_reproduce_the_whole_call(generator):
    """run_down (the down GEMM alone, top-1 so it writes the output) recomputes run()'s output."""
    problem = make_problem(10, 4, 48, 80, 1, DType.FP16, generator)
    runner = MoERunner(*problem, SMALL)
    expected = runner.run().clone()
    runner.output.fill_(float("nan"))
    runner.run_up()
    runner.run_down()
    assert torch.equal(runner.output, expected)


def test_interpreter_switch_is_what_makes_bf16_right(generator):
    """Triton's interpreter computes bf16 dots on raw bit patterns: without the switch the up GEMM
    is garbage; with it, it matches a plain torch computation."""
    M, E, N, K, topk = 8, 2, 32, 64, 1
    x, w13, _, _, topk_ids = make_problem(M, E, N, K, topk, DType.BF16, generator)
    sort = TokenAligner(M * topk, E, SMALL.BLOCK_SIZE_M, "cpu").run(topk_ids)
    expected = torch.stack([x[m].float() @ w13.data[topk_ids[m, 0]].float().T for m in range(M)])

    def up_gemm(interpreter: bool) -> torch.Tensor:
        out = torch.full((M * topk, 2 * N), float("nan"), dtype=torch.bfloat16)
        launch_moe_gemm(x, None, w13, out, sort, None, top_k=topk, config=SMALL, interpreter=interpreter)
        return out

    assert rel_error(up_gemm(True), expected) < 1e-2
    assert not rel_error(up_gemm(False), expected) < 0.5


@pytest.mark.parametrize("dtype, block_shape, config, message", [
    (DType.FP8_W8A8, (64, 96), Config(16, 32, 64, 1, 4, 2), "block_k % BLOCK_SIZE_K"),
    (DType.MXFP4, None, Config(16, 32, 16, 1, 4, 2), "mxfp4 needs BLOCK_SIZE_K % 32"),
    (DType.BF16, None, Config(8, 32, 32, 1, 4, 2), ">= 16"),
])
def test_configs_the_kernel_cannot_run_are_refused(dtype, block_shape, config, message):
    weight = QuantizedWeight(dtype, torch.zeros((1, 32, 32)), torch.ones(1), block_shape=block_shape)
    with pytest.raises(ValueError, match=message):
        check_config(config, weight)


@pytest.mark.parametrize("group_k", [None, 32])
def test_fp8_activation_quantization_matches_quant_py(group_k, generator):
    """The device quantizers reproduce quantize_fp8_activation bit for bit (scales and codes),
    including a partial last group, an all-zero group and values in E4M3's subnormal range."""
    x = (torch.randn((5, 80), generator=generator) * 3).to(torch.bfloat16)
    x[1, :32] = 0
    x[2] *= 1e-3
    expected, expected_scale = quantize_fp8_activation(x, group_k)
    out = torch.full(x.shape, float("nan"), dtype=FP8_DTYPE)
    scale = torch.full(expected_scale.shape, float("nan"))
    if group_k is None:
        amax = torch.zeros(1)
        fp8_absmax(x, amax)
        fp8_quantize_per_tensor(x, amax, out, scale)
    else:
        fp8_quantize_per_group(x, out, scale, group_k)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def test_swiglu_feeds_fp8_quantization(generator):
    """SwiGLU's fused amax equals max |output|; its fused group quantization equals SwiGLU
    followed by the group quantizer."""
    gate_up = torch.randn((6, 2 * 72), generator=generator).to(torch.bfloat16)
    gate, up = gate_up.float().chunk(2, dim=1)
    activated = torch.full((6, 72), float("nan"), dtype=torch.bfloat16)
    amax = torch.zeros(1)
    swiglu(gate_up, activated, amax)
    assert torch.allclose(activated.float(), torch.nn.functional.silu(gate) * up, rtol=1e-2, atol=1e-3)
    assert float(amax) == float(activated.float().abs().max())

    fused = torch.full((6, 72), float("nan"), dtype=FP8_DTYPE)
    fused_scale = torch.full((6, 3), float("nan"))
    swiglu_fp8_groups(gate_up, fused, fused_scale, 32, torch.bfloat16)
    expected, expected_scale = quantize_fp8_activation(activated, 32)
    assert torch.equal(fused_scale, expected_scale)
    assert torch.equal(fused.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("config", [Config(16, 64, 64, 1, 4, 2), Config(16, 64, 32, 1, 4, 2), Config(16, 32, 64, 1, 4, 2)])
def test_block_fp8_tiles_wider_than_the_block_run_as_the_servers_launch_them(config, generator):
    """vLLM's tuner writes BLOCK_SIZE_N/K 256 for block [128, 128] (here 64 over [32, 32]): the
    servers clamp BLOCK_SIZE_K to the block at launch and read weight scales per column, so such a
    config computes the right result (it must be timed, not recorded as a compile error)."""
    from workers.formats import launch_block_k

    assert launch_block_k(config, DType.FP8_W8A8, (32, 32)) == 32
    assert launch_block_k(Config(16, 64, 256, 1, 4, 2), DType.FP8_W8A8, (128, 128)) == 128
    assert launch_block_k(Config(16, 64, 256, 1, 4, 2), DType.BF16, None) == 256
    problem = make_problem(33, 4, 64, 96, 2, DType.FP8_W8A8, generator, block_shape=(32, 32))
    assert run_checked(problem, config) < BOUNDS[DType.FP8_W8A8]
