"""The expert sort (``workers.align``) under the Triton interpreter, against a plain torch sort."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

import pytest
import torch

from workers.align import TokenAligner, moe_align_block_size, padded_capacity

GARBAGE = -7


def random_routing(M: int, E: int, topk: int, generator: torch.Generator, experts: int | None = None) -> torch.Tensor:
    """``[M, topk]`` distinct experts per token, drawn from the first ``experts`` (default all E)."""
    pool = experts or E
    return torch.stack([torch.randperm(pool, generator=generator)[:topk] for _ in range(M)]).to(torch.int32)


def check_sort(topk_ids: torch.Tensor, E: int, block_m: int, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
               num_post_padded: torch.Tensor) -> None:
    flat = topk_ids.flatten().long()
    sentinel = flat.numel()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_post_padded) == int(padded.sum())
    assert int(padded.sum()) <= sorted_ids.numel() == padded_capacity(flat.numel(), E, block_m)
    start = 0
    for expert in range(E):
        run = sorted_ids[start:start + padded[expert]]
        expected_rows = torch.nonzero(flat == expert).flatten()
        assert torch.equal(run[:counts[expert]].long().sort().values, expected_rows), f"expert {expert}"
        assert bool((run[counts[expert]:] == sentinel).all()), f"padding of expert {expert}"
        blocks = expert_ids[start // block_m:(start + padded[expert]) // block_m]
        assert bool((blocks == expert).all()), f"blocks of expert {expert}"
        start += int(padded[expert])


@pytest.mark.parametrize("M, E, topk, block_m, experts_used", [
    (1, 8, 2, 16, None),     # decode: fewer pairs than a block, most experts empty
    (5, 4, 1, 16, None),     # top-1
    (37, 16, 4, 16, None),   # several blocks, uneven counts
    (33, 8, 2, 32, 3),       # experts 3..7 get no tokens
    (600, 64, 8, 64, None),  # several programs in the scatter launch, E > block rows per step
    (60, 128, 8, 16, None),  # one program labels ~150 blocks: many steps of its block loop
])
def test_sort_matches_torch(M, E, topk, block_m, experts_used, generator):
    topk_ids = random_routing(M, E, topk, generator, experts_used)
    aligner = TokenAligner(topk_ids.numel(), E, block_m, "cpu")
    for buffer in (aligner.aligned.sorted_token_ids, aligner.aligned.expert_ids, aligner.aligned.num_tokens_post_padded):
        buffer.fill_(GARBAGE)
    aligned = aligner.run(topk_ids)
    check_sort(topk_ids, E, block_m, aligned.sorted_token_ids, aligned.expert_ids, aligned.num_tokens_post_padded)


def test_worst_case_routing_fits(generator):
    """Every pair on its own expert wastes block_m - 1 rows each: the capacity must hold that."""
    E, block_m = 16, 16
    topk_ids = torch.randperm(E, generator=generator).to(torch.int32).view(8, 2)
    sorted_ids, expert_ids, num_post_padded = moe_align_block_size(topk_ids, E, block_m)
    assert int(num_post_padded) == E * block_m == sorted_ids.numel()
    check_sort(topk_ids, E, block_m, sorted_ids, expert_ids, num_post_padded)


def test_rerun_overwrites_previous_sort(generator):
    """A runner reuses one aligner across calls: a new routing must not see the old cursors."""
    E, block_m = 8, 16
    aligner = TokenAligner(24, E, block_m, "cpu")
    for _ in range(2):
        topk_ids = random_routing(12, E, 2, generator)
        aligned = aligner.run(topk_ids)
        check_sort(topk_ids, E, block_m, aligned.sorted_token_ids, aligned.expert_ids, aligned.num_tokens_post_padded)


def test_rejects_wrong_ids():
    aligner = TokenAligner(4, 4, 16, "cpu")
    with pytest.raises(ValueError, match="int32"):
        aligner.run(torch.zeros((2, 2), dtype=torch.int64))
    with pytest.raises(ValueError, match="4 elements"):
        aligner.run(torch.zeros((3, 2), dtype=torch.int32))
