"""Sort the routed (token, expert) pairs by expert and pad each expert's run to BLOCK_SIZE_M.

The fused-MoE GEMM gives every M-tile of ``block_m`` sorted rows exactly one expert, so each
expert's rows are padded up to a multiple of ``block_m`` with the sentinel ``M * topk`` (an index
past the last pair, masked out by the GEMM). Everything happens on the device in two Triton
launches with sizes known from the shapes alone: no host synchronisation, so the whole MoE call
can be captured in a CUDA graph.

Launch 1 (one program) counts the pairs per expert, pads the counts and prefix-sums them into
each expert's first row; launch 2 (many programs) scatters every pair to its expert's next free
row with an atomic cursor, fills each block's expert id and writes the sentinel into the padding.
Rows of one expert land in no particular order (the cursor is atomic); every row of the GEMM is
computed independently, so the order changes no result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from workers.workspace import PRIVATE, Workspace

_COUNT_CHUNK = 1024
"""Pairs one iteration of the counting loop histograms."""
_SCATTER_CHUNK = 512
"""Pairs each program of launch 2 scatters."""
_BLOCKS_PER_STEP = 16
"""Blocks launch 2 labels and pads per loop step. A constant, not a function of the batch size:
a constexpr derived from M would compile the kernel anew for every M (and miss what compile-ahead
compiled for another M). Tiles stay small: 16 x expert bins compares, 16 x BLOCK_M stores."""


@dataclass(frozen=True)
class AlignedTokens:
    """The sort the GEMM reads.

    ``sorted_token_ids [capacity]``: flat pair indices (token * topk + slot) grouped by expert,
    each expert's run padded to ``block_m`` with ``M * topk``; ``expert_ids [capacity/block_m]``:
    the expert of each block; ``num_tokens_post_padded [1]``: rows in use. Only rows below
    ``num_tokens_post_padded`` (and their blocks) are written; the GEMM never reads past them.
    """

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    block_m: int


def padded_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the worst-case routing needs: each non-empty expert wastes at most ``block_m - 1``.

    At most ``min(E, pairs)`` experts are non-empty; rounded up to whole blocks so the GEMM grid
    is a static function of the shapes.
    """
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


class TokenAligner:
    """Buffers for one (pairs, experts, block_m) problem, allocated once; ``run`` fills them."""

    def __init__(self, num_pairs: int, num_experts: int, block_m: int, device: torch.device | str,
                 workspace: Workspace = PRIVATE) -> None:
        if num_pairs < 1 or num_experts < 1 or block_m < 1:
            raise ValueError(f"need positive sizes, got pairs={num_pairs} experts={num_experts} block_m={block_m}")
        self.num_pairs = num_pairs
        self.num_experts = num_experts
        self.block_m = block_m
        capacity = padded_capacity(num_pairs, num_experts, block_m)
        self.num_blocks = capacity // block_m
        # One aligner per tile height in a workspace: a runner whose GEMMs sort for two heights
        # keeps both sorts.
        def empty(role: str, shape: tuple[int, ...]) -> torch.Tensor:
            return workspace.empty(f"sort_m{block_m}.{role}", shape, torch.int32, device)

        self.aligned = AlignedTokens(
            sorted_token_ids=empty("sorted_token_ids", (capacity,)),
            expert_ids=empty("expert_ids", (self.num_blocks,)),
            num_tokens_post_padded=empty("num_tokens_post_padded", (1,)),
            block_m=block_m,
        )
        # Per expert: the atomic cursor, the end of its padded run, the end of its real rows.
        self._expert_rows = empty("expert_rows", (3, num_experts))
        self._expert_bins = triton.next_power_of_2(num_experts + 1)
        self._programs = triton.cdiv(num_pairs, _SCATTER_CHUNK)
        self._blocks_per_program = triton.cdiv(self.num_blocks, self._programs)

    def run(self, topk_ids: torch.Tensor) -> AlignedTokens:
        """Sort ``topk_ids [M, topk]`` (int32, contiguous, values in [0, E), or -1 for a pair routed to
        another GPU's expert under expert parallelism: skipped, as vLLM's sort with an expert map)."""
        if topk_ids.numel() != self.num_pairs or topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous():
            raise ValueError(f"topk_ids must be contiguous int32 with {self.num_pairs} elements, "
                             f"got {tuple(topk_ids.shape)} {topk_ids.dtype}")
        aligned = self.aligned
        cursor, padded_end, valid_end = self._expert_rows
        _count_experts_kernel[(1,)](
            topk_ids, aligned.num_tokens_post_padded, cursor, padded_end, valid_end,
            self.num_pairs, self.num_experts,
            BLOCK_M=self.block_m, EXPERT_BINS=self._expert_bins, CHUNK=_COUNT_CHUNK)
        _scatter_pairs_kernel[(self._programs,)](
            topk_ids, aligned.sorted_token_ids, aligned.expert_ids, aligned.num_tokens_post_padded,
            cursor, padded_end, valid_end,
            self.num_pairs, self.num_experts, self._blocks_per_program,
            BLOCK_M=self.block_m, EXPERT_BINS=self._expert_bins, CHUNK=_SCATTER_CHUNK,
            BLOCKS_PER_STEP=_BLOCKS_PER_STEP)
        return aligned


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_token_ids, expert_ids, num_tokens_post_padded)`` for ``topk_ids [M, topk]``.

    Allocates fresh buffers; a caller that repeats the call (the MoE runner) keeps a
    ``TokenAligner`` instead.
    """
    ids = topk_ids.to(torch.int32).contiguous()
    aligned = TokenAligner(ids.numel(), num_experts, block_m, ids.device).run(ids)
    return aligned.sorted_token_ids, aligned.expert_ids, aligned.num_tokens_post_padded


@triton.jit(do_not_specialize=["num_pairs"])  # batch-size dependent: one compile for every M
def _count_experts_kernel(topk_ids_ptr, num_tokens_post_padded_ptr, cursor_ptr, padded_end_ptr,
                          valid_end_ptr, num_pairs, num_experts,
                          BLOCK_M: tl.constexpr, EXPERT_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """One program: per-expert counts → padded runs → first row of each expert."""
    offs = tl.arange(0, CHUNK)
    counts = tl.zeros((EXPERT_BINS,), dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        # Lanes past the end count into bin ``num_experts``, which no expert owns.
        ids = tl.load(topk_ids_ptr + start + offs, mask=start + offs < num_pairs, other=num_experts)
        ids = tl.where(ids < 0, num_experts, ids)  # -1: another GPU's expert (expert parallelism)
        counts += tl.histogram(ids, EXPERT_BINS)
    experts = tl.arange(0, EXPERT_BINS)
    is_expert = experts < num_experts
    counts = tl.where(is_expert, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    first_row = padded_end - padded
    tl.store(cursor_ptr + experts, first_row, mask=is_expert)
    tl.store(padded_end_ptr + experts, padded_end, mask=is_expert)
    tl.store(valid_end_ptr + experts, first_row + counts, mask=is_expert)
    tl.store(num_tokens_post_padded_ptr, tl.sum(padded, axis=0))


@triton.jit(do_not_specialize=["num_pairs", "blocks_per_program"])  # batch-size dependent
def _scatter_pairs_kernel(topk_ids_ptr, sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
                          cursor_ptr, padded_end_ptr, valid_end_ptr,
                          num_pairs, num_experts, blocks_per_program,
                          BLOCK_M: tl.constexpr, EXPERT_BINS: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCKS_PER_STEP: tl.constexpr):
    """Each program: scatter ``CHUNK`` pairs, then label its share of blocks and pad them."""
    pid = tl.program_id(0)
    pairs = pid * CHUNK + tl.arange(0, CHUNK)
    in_range = pairs < num_pairs
    ids = tl.load(topk_ids_ptr + pairs, mask=in_range, other=0)
    here = in_range & (ids >= 0)  # pairs routed to another GPU's experts are not computed here
    rows = tl.atomic_add(cursor_ptr + tl.where(here, ids, 0), 1, mask=here)
    tl.store(sorted_token_ids_ptr + rows, pairs, mask=here)

    total_rows = tl.load(num_tokens_post_padded_ptr)
    experts = tl.arange(0, EXPERT_BINS)
    ends = tl.load(padded_end_ptr + experts, mask=experts < num_experts, other=2147483647)
    block_rows = tl.arange(0, BLOCK_M)
    sentinel = num_pairs
    first_block = pid * blocks_per_program
    for step in range(0, blocks_per_program, BLOCKS_PER_STEP):
        blocks = first_block + step + tl.arange(0, BLOCKS_PER_STEP)
        block_start = blocks * BLOCK_M
        live = (block_start < total_rows) & (step + tl.arange(0, BLOCKS_PER_STEP) < blocks_per_program)
        # The owner of a block is the number of experts whose padded run ends at or before it.
        owner = tl.sum((ends[None, :] <= block_start[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, owner, mask=live)
        owner_valid_end = tl.load(valid_end_ptr + owner, mask=live, other=0)
        row = block_start[:, None] + block_rows[None, :]
        is_padding = live[:, None] & (row >= owner_valid_end[:, None])
        tl.store(sorted_token_ids_ptr + row, tl.zeros_like(row) + sentinel, mask=is_padding)
