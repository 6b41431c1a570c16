"""What one GPU's kernel sees under expert parallelism (vLLM's TP+EP layout) and under SGLang's
shared-expert fusion: routing, sort, kernel and reference, on tiny shapes under the interpreter."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

import numpy as np
import pytest
import torch

from workers.align import moe_align_block_size
from workers.moe import MoERunner
from workers.problem import ERROR_BOUNDS, build_problem, rel_error
from workers.records import Config, DType, MoEShape
from workers.routing import make_routing

SMALL = Config(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=2)


def test_ep_routing_keeps_this_gpus_share_of_global_top_k():
    # Qwen3-235B-like at ep=8: 16 of 128 experts here, top-8 over all 128.
    weights, ids = make_routing("uniform", 4096, 16, 8, torch.Generator().manual_seed(0), "cpu", ep=8)
    assert ids.shape == (4096, 8) and weights.shape == (4096, 8)
    here = ids >= 0
    assert int(ids.max()) < 16 and int(ids.min()) == -1
    pairs_per_token = here.sum().item() / 4096
    assert 0.85 < pairs_per_token < 1.15  # about M*topk/ep = M pairs, not 8*M
    for row in ids:  # the pairs computed here are distinct experts
        local = row[row >= 0]
        assert local.unique().numel() == local.numel()


def test_ep_routing_file_takes_global_ids_and_the_busiest_gpu(tmp_path):
    # 32 global experts over ep=4 (8 per GPU); the trace sends most picks to GPU 2's experts 16..23.
    rng = np.random.default_rng(0)
    rows = [np.r_[rng.choice(np.arange(16, 24), 2, replace=False), rng.choice(np.arange(0, 16), 2, replace=False)]
            for _ in range(64)]
    path = tmp_path / "ids.npy"
    np.save(path, np.stack(rows).astype(np.int64))
    _, ids = make_routing(f"file:{path}", 64, 8, 4, torch.Generator().manual_seed(1), "cpu", ep=4)
    assert ((ids >= 0).sum(dim=1) == 2).all()  # exactly GPU 2's two picks per token stay
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        np.save(path, np.full((4, 4), 40, dtype=np.int64) - np.arange(4))
        make_routing(f"file:{path}", 4, 8, 4, torch.Generator(), "cpu", ep=4)


def test_fused_shared_expert_takes_every_tokens_last_slot():
    # DeepSeek-V3 in SGLang: 256 routed + 1 shared = E 257, top-k 8 + 1.
    weights, ids = make_routing("zipf:1.2", 300, 257, 9, torch.Generator().manual_seed(2), "cpu", fused_shared=1)
    assert (ids[:, -1] == 256).all() and (weights[:, -1] == 1).all()
    assert int(ids[:, :-1].max()) < 256
    assert torch.allclose(weights[:, :-1].sum(dim=1), torch.ones(300))


def test_sort_skips_pairs_of_other_gpus():
    ids = torch.tensor([[0, -1], [-1, 1], [1, 0]], dtype=torch.int32)
    sorted_ids, expert_ids, post = moe_align_block_size(ids, 2, 4)
    rows = int(post.item())
    assert rows == 8  # two experts, two pairs each, padded to 4: the -1 pairs take no rows
    real = sorted(int(v) for v in sorted_ids[:rows] if int(v) < ids.numel())
    assert real == [0, 3, 4, 5]


# Other GPUs' pairs leave their rows of the up GEMM's output unwritten (NaN after poisoning); block
# fp8 quantizes those rows too, and nothing reads the result.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype,block", [(DType.BF16, None), (DType.FP8_W8A8, None), (DType.FP8_W8A8, (32, 32))])
@pytest.mark.parametrize("layout", [dict(ep=4), dict(fused_shared=1), dict(ep=2, fused_shared=1)])
def test_kernel_matches_reference_under_layouts(dtype, block, layout):
    fused = layout.get("fused_shared", 0)
    shape = MoEShape(E=4 + fused, N=64, K=64, topk=3 + (1 if fused else 0), dtype=dtype, block_shape=block, **layout)
    for M in (1, 33):
        problem = build_problem(shape, M, seed=M)
        if shape.ep > 1:
            assert (problem.topk_ids < 0).any() or M == 1
        runner = MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, SMALL)
        runner.poison_buffers()
        err = rel_error(runner.run(), problem.reference)
        assert err < ERROR_BOUNDS[dtype] / 2, (M, err)


def test_top1_under_ep_zeroes_tokens_routed_elsewhere():
    shape = MoEShape(E=4, N=64, K=64, topk=1, dtype=DType.BF16, ep=4)
    problem = build_problem(shape, 16, seed=3)
    remote = (problem.topk_ids[:, 0] < 0)
    assert remote.any()
    runner = MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, SMALL)
    runner.poison_buffers()
    out = runner.run().float()
    assert (out[remote] == 0).all()
    assert rel_error(out, problem.reference) < 1e-2


@pytest.mark.parametrize("dtype,block", [(DType.BF16, None), (DType.FP8_W8A8, None), (DType.FP8_W8A8, (32, 32))])
def test_non_gated_relu2_experts_match_reference(dtype, block):
    # Nemotron-H: up weight [E, N, K], relu² between the GEMMs.
    shape = MoEShape(E=4, N=64, K=96, topk=2, dtype=dtype, block_shape=block, gated=False)
    for M in (1, 33):
        problem = build_problem(shape, M, seed=M)
        assert problem.w13.shape == (4, 64, 96)
        runner = MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, SMALL)
        runner.poison_buffers()
        assert rel_error(runner.run(), problem.reference) < ERROR_BOUNDS[dtype] / 2


@pytest.mark.parametrize("gated", [True, False])
def test_per_channel_fp8_matches_reference(gated):
    # Per-channel weight scales, per-token dynamic activation scales (compressed-tensors channel/token).
    shape = MoEShape(E=4, N=64, K=96, topk=2, dtype=DType.FP8_W8A8, per_channel=True, gated=gated)
    for M in (1, 33):
        problem = build_problem(shape, M, seed=M)
        assert problem.w13.per_channel and problem.w13.scale.shape == (4, shape.up_rows)
        runner = MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, SMALL)
        runner.poison_buffers()
        assert rel_error(runner.run(), problem.reference) < ERROR_BOUNDS[DType.FP8_W8A8] / 2
