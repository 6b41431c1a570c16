"""The config vLLM falls back to when no tuned file exists for a shape.

This is the baseline every tuned config is judged against (``moe-tune bench`` times it next to
each config folder). The rules follow the description of vLLM's ``get_default_config`` in
``vllm/model_executor/layers/fused_moe/fused_moe.py``; they are reimplemented here, not copied:

- fp8_w8a8 with block quantization ``[bn, bk]``: the tile follows the quantization block
  (BLOCK_SIZE_N = bn, BLOCK_SIZE_K = bk, so each tile reads one scale), BLOCK_SIZE_M 64,
  GROUP_SIZE_M 32, 4 warps, 3 stages.
- otherwise, decode-sized batches (M <= E, i.e. fewer tokens than experts, most experts see at
  most one or two tokens): a small tile, BLOCK_SIZE_M 16, BLOCK_SIZE_N 32, BLOCK_SIZE_K 64,
  GROUP_SIZE_M 1.
- otherwise (prefill-sized batches): BLOCK_SIZE_M 64, BLOCK_SIZE_N 64, BLOCK_SIZE_K 32,
  GROUP_SIZE_M 8.

Without block quantization vLLM sets no ``num_warps``/``num_stages``, so Triton's launch
defaults apply on the GPU: 4 warps, 3 stages; they are written out here so the baseline is a
complete, timeable config.

- int4_w4a16 (block shape ``[0, group]``, vLLM's GPTQ/AWQ Triton kernel): BLOCK_SIZE_M 16 up to
  20 tokens, 32 up to 40, else 64; GROUP_SIZE_M 1; BLOCK_SIZE_N 32 and BLOCK_SIZE_K 64 for a
  single token, else 64 and 32 (``get_default_config`` and ``get_moe_wna16_block_config``).

vLLM's group-quantized int8 path (``block_shape`` with int8_w8a16) runs that GPTQ/AWQ kernel
too, which this project does not run for int8, so that combination is refused rather than guessed.
"""

from __future__ import annotations

from workers.records import Config, DType, MoEShape

TRITON_DEFAULT_WARPS = 4
TRITON_DEFAULT_STAGES = 3

_BLOCK_FP8_TILE_M = 64
_BLOCK_FP8_GROUP_M = 32
_DECODE = Config(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1,
                 num_warps=TRITON_DEFAULT_WARPS, num_stages=TRITON_DEFAULT_STAGES)
_PREFILL = Config(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=32, GROUP_SIZE_M=8,
                  num_warps=TRITON_DEFAULT_WARPS, num_stages=TRITON_DEFAULT_STAGES)


def default_config(shape: MoEShape, M: int) -> Config:
    """vLLM's fallback config for ``M`` tokens of ``shape`` (no tuned file present)."""
    if M < 1:
        raise ValueError(f"batch size must be >= 1, got {M}")
    if shape.dtype is DType.INT4_W4A16:
        block_n, block_k = (32, 64) if M == 1 else (64, 32)
        return Config(BLOCK_SIZE_M=16 if M <= 20 else 32 if M <= 40 else 64, BLOCK_SIZE_N=block_n,
                      BLOCK_SIZE_K=block_k, GROUP_SIZE_M=1, num_warps=TRITON_DEFAULT_WARPS,
                      num_stages=TRITON_DEFAULT_STAGES)
    if shape.block_shape is not None:
        if shape.dtype is not DType.FP8_W8A8:
            raise ValueError(f"no default config for block-quantized {shape.dtype.value} "
                             "(vLLM routes it to its GPTQ/AWQ kernel)")
        block_n, block_k = shape.block_shape
        return Config(BLOCK_SIZE_M=_BLOCK_FP8_TILE_M, BLOCK_SIZE_N=block_n, BLOCK_SIZE_K=block_k,
                      GROUP_SIZE_M=_BLOCK_FP8_GROUP_M, num_warps=TRITON_DEFAULT_WARPS,
                      num_stages=TRITON_DEFAULT_STAGES)
    return _DECODE if M <= shape.E else _PREFILL
