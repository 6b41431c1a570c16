"""The whole fused-MoE call: sort → (fp8: quantize) → up GEMM → SwiGLU, or relu² for non-gated
experts (fp8: with the intermediate's quantization) → down GEMM × routed weight → sum over top-k.

``MoERunner`` allocates every buffer once so that ``run()`` only launches kernels: no host
synchronisation and no shape-dependent allocation, which is what CUDA-graph capture and repeated
timing need. The up and down GEMMs may take different configs (SGLang tunes them apart); when
their BLOCK_SIZE_M differ, the routed pairs are sorted a second time for the down GEMM's tile
height (a few µs) rather than forcing one tile height on both.
"""

from __future__ import annotations

import weakref

import torch

from workers.activation import swiglu, swiglu_fp8_groups
from workers.align import TokenAligner
from workers.fp8_activation import fp8_absmax, fp8_quantize_per_group, fp8_quantize_per_tensor, fp8_scale_shape
from workers.formats import launch_block_k
from workers.fp4_layout import Fp4Atoms, fits_atoms, prepare_atoms
from workers.fused_moe_kernel import check_config, launch_layout, launch_moe_gemm
from workers.quant import FP8_DTYPE, QuantizedWeight, activation_dtype
from workers.records import Config, DType
from workers.workspace import PRIVATE, Workspace


_prepared: dict[tuple[int, bool], QuantizedWeight | Fp4Atoms] = {}
"""fp4 launch layouts by (``id`` of the source ``QuantizedWeight``, atom layout or not): a tune
builds one runner per candidate on the same weights, and the atom preparation reads and rewrites
the whole weight. An entry is dropped when its source weight is freed (``weakref.finalize``), so
it never outlives it nor answers for another object that reuses the id; the source is not
referenced (``launch_layout``'s copy shares only its packed data)."""


class MoERunner:
    """One MoE problem (inputs, weights, configs) with its buffers, ready to launch repeatedly.

    ``run()`` computes the whole op into ``output [M, K]`` (x's dtype). For split timing,
    ``run_up()`` is the sort plus the up GEMM (plus the input's fp8 quantization) and
    ``run_down()`` the down GEMM (plus, for per-tensor fp8, the intermediate's quantization pass,
    and its own sort when its BLOCK_SIZE_M differs); ``run_down`` reads the SwiGLU output and sort
    left by the last ``run()``. ``topk_ids`` must hold experts in [0, E) or -1 (a pair computed
    on another GPU under expert parallelism); not checked beyond that, which would sync the host.
    ``fp4_atoms`` (default) prepares each fp4 weight once in the atom layout
    (``workers.fp4_layout``) when its GEMM's config covers whole atoms (BLOCK_SIZE_N % 16 == 0,
    BLOCK_SIZE_K % 64 == 0); that GEMM then runs with swapped operands. Otherwise, or with
    ``fp4_atoms=False``, the weight keeps the row-major layout with K-group-major scales, and
    ``fp4_swap`` runs it with swapped operands (``launch_moe_gemm``'s ``swap_ab``).
    ``benchmarks/fp4_kernel_bench.py`` times the variants.
    ``workspace``: where the buffers come from (``workers.workspace``; default: the runner's own).
    """

    def __init__(self, x: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor, config: Config,
                 down_config: Config | None = None, fp4_swap: bool = False, fp4_atoms: bool = True,
                 workspace: Workspace = PRIVATE) -> None:
        M, K = x.shape
        E, up_rows, w13_k = w13.shape
        N = w2.shape[2]
        self._gated = up_rows == 2 * N  # else non-gated experts: w13 [E, N, K], relu² between the GEMMs
        if w13.dtype is not w2.dtype or w13.block_shape != w2.block_shape:
            raise ValueError(f"w13 ({w13.dtype.value}) and w2 ({w2.dtype.value}) must share dtype and block shape")
        if up_rows not in (N, 2 * N) or w13_k != K or w2.shape != (E, K, N):
            raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w13 {w13.shape}, w2 {w2.shape}")
        if x.dtype != activation_dtype(w13.dtype):
            raise ValueError(f"{w13.dtype.value} takes {activation_dtype(w13.dtype)} activations, got {x.dtype}")
        if topk_ids.dim() != 2 or topk_ids.shape[0] != M or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"routing must be [M={M}, topk], got ids {tuple(topk_ids.shape)}, "
                             f"weights {tuple(topk_weights.shape)}")
        down_config = down_config or config
        check_config(config, w13)
        check_config(down_config, w2)

        self.x = x.contiguous()
        self.w13 = self._launch_weight(w13, config, fp4_atoms)
        self.w2 = self._launch_weight(w2, down_config, fp4_atoms)
        self.topk_ids = topk_ids.to(torch.int32).contiguous()
        self.topk_weights = topk_weights.contiguous()
        self.config, self.down_config = config, down_config
        self._fp4_swap = fp4_swap
        self.topk = topk_ids.shape[1]
        # Pairs routed to other GPUs' experts (id -1, expert parallelism) are never computed: their
        # rows of the down GEMM's output are zeroed every call (vLLM zeroes that cache with an
        # expert map), and under per-tensor fp8 the up GEMM's too, so no stale row sets a scale.
        self._remote_pairs = self.topk_ids.device.type != "meta" and bool((self.topk_ids < 0).any())
        pairs = M * self.topk
        device = x.device
        self._fp8 = w13.dtype is DType.FP8_W8A8
        # Activation scale groups of the input (over K) and of the intermediate (over N): block fp8
        # one per block_k columns; per-channel fp8 one per row (per-token dynamic scales); None
        # for per-tensor scales.
        if self._fp8 and w13.block_shape is not None:
            self._in_group = self._mid_group = w13.block_shape[1]
        elif self._fp8 and w13.per_channel:
            self._in_group, self._mid_group = K, N
        else:
            self._in_group = self._mid_group = None
        self._group_k = self._in_group

        self._up_sort = TokenAligner(pairs, E, config.BLOCK_SIZE_M, device, workspace)
        self._down_sort = (self._up_sort if down_config.BLOCK_SIZE_M == config.BLOCK_SIZE_M
                           else TokenAligner(pairs, E, down_config.BLOCK_SIZE_M, device, workspace))
        empty = workspace.empty
        self._gate_up = empty("gate_up", (pairs, up_rows), x.dtype, device)
        # Block fp8 quantizes inside the SwiGLU kernel: no activation-dtype intermediate.
        self._activated = None if self._group_k else empty("activated", (pairs, N), x.dtype, device)
        self.output = empty("output", (M, K), x.dtype, device)
        # With top-1 the down GEMM's rows are the output rows: no sum needed.
        self._down = self.output if self.topk == 1 else empty("down", (pairs, K), x.dtype, device)
        if self._fp8:
            self._x_fp8 = empty("x_fp8", (M, K), FP8_DTYPE, device)
            self._activated_fp8 = empty("activated_fp8", (pairs, N), FP8_DTYPE, device)
            self._x_scale = empty("x_scale", fp8_scale_shape(M, K, self._in_group), torch.float32, device)
            self._activated_scale = empty("activated_scale", fp8_scale_shape(pairs, N, self._mid_group),
                                          torch.float32, device)
            self._x_amax = empty("x_amax", (1,), torch.float32, device)
            self._activated_amax = empty("activated_amax", (1,), torch.float32, device)

    @staticmethod
    def _launch_weight(weight: QuantizedWeight, config: Config, fp4_atoms: bool) -> QuantizedWeight | Fp4Atoms:
        """The weight as its GEMM reads it: fp4 in the atom layout where asked for and the config
        covers whole atoms, else ``launch_layout``'s. An fp4 weight's layouts are prepared once per
        ``weight`` object (``_prepared``), not once per runner."""
        if weight.dtype not in (DType.MXFP4, DType.NVFP4):
            return launch_layout(weight)
        atoms = fp4_atoms and fits_atoms(config.BLOCK_SIZE_N, launch_block_k(config, weight.dtype, None))
        key = (id(weight), atoms)
        if key not in _prepared:
            prepared = prepare_atoms(weight) if atoms else launch_layout(weight)
            if prepared is weight:  # nothing to keep (a cache holding its own key would never drop it)
                return weight
            _prepared[key] = prepared
            weakref.finalize(weight, _prepared.pop, key, None)
        return _prepared[key]

    def poison_buffers(self) -> None:
        """Fill every buffer the kernels write with values that fail a check if left unwritten.

        NaN in activations, scales and the output; in the sort, an index past every token (a row
        the GEMM would mask out, leaving NaN behind). Correctness checks call this before ``run()``.
        """
        buffers = [self._gate_up, self._activated, self._down, self.output]
        if self._fp8:
            buffers += [self._x_fp8, self._activated_fp8, self._x_scale, self._activated_scale]
        for buffer in buffers:
            if buffer is not None:
                buffer.fill_(float("nan"))
        for sort in (self._up_sort, self._down_sort):
            sort.aligned.sorted_token_ids.fill_(torch.iinfo(torch.int32).max)

    def run_up(self) -> None:
        aligned = self._up_sort.run(self.topk_ids)
        if self._remote_pairs and self._fp8 and not self._group_k:
            self._gate_up.zero_()
        a, a_scale = self.x, None
        if self._fp8:
            a, a_scale = self._x_fp8, self._x_scale
            if self._group_k:
                fp8_quantize_per_group(self.x, a, a_scale, self._in_group)
            else:
                self._x_amax.zero_()
                fp8_absmax(self.x, self._x_amax)
                fp8_quantize_per_tensor(self.x, self._x_amax, a, a_scale)
        launch_moe_gemm(a, a_scale, self.w13, self._gate_up, aligned, None, top_k=self.topk, config=self.config,
                        swap_ab=self._fp4_swap)

    def _activate(self) -> None:
        if self._group_k:
            swiglu_fp8_groups(self._gate_up, self._activated_fp8, self._activated_scale, self._mid_group,
                              self.x.dtype, gated=self._gated)
        elif self._fp8:
            self._activated_amax.zero_()
            swiglu(self._gate_up, self._activated, self._activated_amax, gated=self._gated)
        else:
            swiglu(self._gate_up, self._activated, gated=self._gated)

    def run_down(self) -> None:
        aligned = self._down_sort.run(self.topk_ids) if self._down_sort is not self._up_sort else self._up_sort.aligned
        a, a_scale = self._activated, None
        if self._fp8:
            a, a_scale = self._activated_fp8, self._activated_scale
            if not self._group_k:
                fp8_quantize_per_tensor(self._activated, self._activated_amax, a, a_scale)
        if self._remote_pairs:
            self._down.zero_()
        launch_moe_gemm(a, a_scale, self.w2, self._down, aligned, self.topk_weights, top_k=1,
                        config=self.down_config, swap_ab=self._fp4_swap)

    def run(self) -> torch.Tensor:
        """The whole MoE call; returns ``output``."""
        self.run_up()
        self._activate()
        self.run_down()
        if self.topk > 1:
            torch.sum(self._down.view(self.output.shape[0], self.topk, -1), dim=1, out=self.output)
        return self.output


def fused_moe(x: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: Config, down_config: Config | None = None) -> torch.Tensor:
    """``[M, K]`` in x's dtype: sum_j topk_weights[m,j] · w2[e_j] @ (silu(gate_j) · up_j).

    ``x [M, K]``; ``w13 [E, 2N, K]`` (gate rows first), or ``[E, N, K]`` for non-gated experts (relu²);
    ``w2 [E, K, N]``; routing ``[M, topk]``.
    Allocates its buffers per call; repeated calls should keep a ``MoERunner``.
    """
    return MoERunner(x, w13, w2, topk_weights, topk_ids, config, down_config).run()
