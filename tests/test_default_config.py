"""vLLM's default-config rules, checked over random shapes and batch sizes."""

from __future__ import annotations

import random

import pytest

from workers.default_config import default_config
from workers.records import Config, DType, MoEShape

DECODE = (16, 32, 64, 1)
PREFILL = (64, 64, 32, 8)


def _tile(config: Config) -> tuple[int, int, int, int]:
    return config.BLOCK_SIZE_M, config.BLOCK_SIZE_N, config.BLOCK_SIZE_K, config.GROUP_SIZE_M


@pytest.mark.parametrize("dtype", [d for d in DType if d is not DType.INT4_W4A16])  # int4: tests/test_int4.py
def test_tile_switches_from_decode_to_prefill_when_tokens_exceed_experts(dtype: DType, rng: random.Random) -> None:
    E = rng.choice([8, 16, 32, 64, 128, 256])
    shape = MoEShape(E=E, N=rng.choice([256, 1024, 7168]), K=rng.choice([2048, 4096]), topk=2, dtype=dtype)
    for M in (1, rng.randint(1, E), E):
        assert _tile(default_config(shape, M)) == DECODE, (E, M)
    for M in (E + 1, rng.randint(E + 1, 8 * E), 16 * E):
        assert _tile(default_config(shape, M)) == PREFILL, (E, M)


def test_triton_launch_defaults_are_written_out(rng: random.Random) -> None:
    shape = MoEShape(E=8, N=128, K=128, topk=2, dtype=DType.BF16)
    for M in (1, rng.randint(9, 4096)):
        config = default_config(shape, M)
        assert (config.num_warps, config.num_stages) == (4, 3)


@pytest.mark.parametrize("dtype", [DType.MXFP4, DType.NVFP4])
def test_fp4_defaults_satisfy_the_kernels_k_tile_rule(dtype: DType, rng: random.Random) -> None:
    """The fp4 kernels dequantize whole scale groups per K tile (32 resp. 16 elements)."""
    group = 32 if dtype is DType.MXFP4 else 16
    shape = MoEShape(E=rng.choice([32, 128]), N=2880, K=2880, topk=4, dtype=dtype)
    for M in (1, shape.E + rng.randint(1, 1000)):
        assert default_config(shape, M).BLOCK_SIZE_K % group == 0


def test_block_fp8_tile_follows_the_quantization_block_at_every_batch_size(rng: random.Random) -> None:
    block = (rng.choice([64, 128]), rng.choice([64, 128]))
    shape = MoEShape(E=256, N=256, K=7168, topk=8, dtype=DType.FP8_W8A8, block_shape=block)
    for M in (1, 256, rng.randint(257, 8192)):
        config = default_config(shape, M)
        assert (config.BLOCK_SIZE_M, config.BLOCK_SIZE_N, config.BLOCK_SIZE_K) == (64, block[0], block[1])
        assert config.GROUP_SIZE_M == 32
        assert (config.num_warps, config.num_stages) == (4, 3)


def test_refuses_what_vllm_sends_to_another_kernel_and_bad_batch_sizes() -> None:
    grouped_int8 = MoEShape(E=8, N=128, K=128, topk=2, dtype=DType.INT8_W8A16, block_shape=(128, 128))
    with pytest.raises(ValueError, match="int8_w8a16"):
        default_config(grouped_int8, 16)
    with pytest.raises(ValueError, match="batch size"):
        default_config(MoEShape(E=8, N=128, K=128, topk=2, dtype=DType.BF16), 0)
