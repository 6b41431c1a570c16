"""Search space files, their validation, device limits, and pruning that keeps every winner."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tuner.errors import UsageError
from tuner.spaces import (REASONS, DeviceLimits, load_space, prune, shared_memory_lower_bound,
                          space_names)
from workers.records import Config, DType, MoEShape

H200 = DeviceLimits.for_device("NVIDIA H200")
KB = 1024

VLLM_CUDA_SPACE = {
    "BLOCK_SIZE_M": (16, 32, 64, 128, 256),
    "BLOCK_SIZE_N": (32, 64, 128, 256),
    "BLOCK_SIZE_K": (64, 128, 256),
    "GROUP_SIZE_M": (1, 16, 32, 64),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
}


def test_default_space_is_vllms_1920():
    space = load_space("default")
    assert space.values == VLLM_CUDA_SPACE
    configs = space.expand()
    assert space.size == len(configs) == len(set(configs)) == 1920


def test_wide_space_contains_default():
    default, wide = load_space("default"), load_space("wide")
    assert set(default.expand()) < set(wide.expand())
    assert len(wide.expand()) == wide.size


def test_every_shipped_space_loads():
    assert {"default", "wide"} <= set(space_names())
    for name in space_names():
        assert load_space(name).size > 0


def _write_space(tmp_path, **overrides):
    values = {k: list(v) for k, v in VLLM_CUDA_SPACE.items()}
    values.update(overrides)
    lines = [f"{k}: {v}" for k, v in values.items() if v is not None]
    path = tmp_path / "space.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_space_file_by_path(tmp_path):
    space = load_space(str(_write_space(tmp_path, num_warps=[4])))
    assert space.name == "space" and space.size == 960


@pytest.mark.parametrize("overrides,message", [
    ({"BLOCK_SIZE_N": [48]}, "powers of two"),
    ({"BLOCK_SIZE_K": [8, 16]}, "powers of two >= 16"),
    ({"num_warps": [64]}, "num_warps"),
    ({"num_stages": [0, 2]}, ">= 1"),
    ({"GROUP_SIZE_M": []}, "GROUP_SIZE_M"),
    ({"BLOCK_SIZE_M": [16, 16]}, "repeat"),
    ({"BLOCK_SIZE_M": None}, "BLOCK_SIZE_M: Field required"),
    ({"BLOCK_SIZE_X": [16]}, "BLOCK_SIZE_X: Extra inputs"),
    ({"num_warps": "four"}, "num_warps"),
])
def test_bad_space_files_give_one_line(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message) as info:
        load_space(str(_write_space(tmp_path, **overrides)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content,message", [("BLOCK_SIZE_M: [16\n", "cannot read"), ("- 1\n- 2\n", "maps the six")])
def test_unreadable_space_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        load_space(str(path))
    assert "\n" not in str(info.value)


def test_unknown_space_lists_the_shipped_ones():
    with pytest.raises(UsageError, match="default"):
        load_space("no-such-space")


@pytest.mark.parametrize("name,kb", [
    ("NVIDIA H100 80GB HBM3", 227), ("NVIDIA_H200", 227), ("NVIDIA H200 NVL", 227),
    ("NVIDIA A100-SXM4-80GB", 163), ("NVIDIA L40S", 99), ("Some Future GPU", 227),
])
def test_device_limits(name, kb):
    assert DeviceLimits.for_device(name).shared_memory_bytes == kb * KB


@pytest.mark.parametrize("config,dtype,expected", [
    # (num_stages - 1) × (BM×BK×a + BK×BN×b), a/b bytes per element
    (Config(128, 256, 128, 1, 8, 4), DType.BF16, 3 * (128 * 128 * 2 + 128 * 256 * 2)),
    (Config(64, 128, 256, 1, 4, 4), DType.FP8_W8A8, 3 * (64 * 256 + 256 * 128)),
    (Config(64, 128, 256, 1, 4, 3), DType.INT8_W8A16, 2 * (64 * 256 * 2 + 256 * 128)),
    (Config(64, 128, 256, 1, 4, 5), DType.MXFP4, 4 * (64 * 256 * 2 + 256 * 128 // 2)),
    (Config(256, 256, 256, 1, 8, 1), DType.BF16, 0),  # no pipelining: nothing certain to stage
])
def test_shared_memory_formula(config, dtype, expected):
    assert shared_memory_lower_bound(config, dtype) == expected


def _random_shape(rng: random.Random) -> MoEShape:
    dtype = rng.choice(list(DType))
    block = rng.choice([None, (128, 128), (64, 128)]) if dtype is DType.FP8_W8A8 else None
    return MoEShape(E=rng.choice([8, 64, 256]), N=rng.choice([256, 1024, 7168]), K=rng.choice([2048, 7168]),
                    topk=rng.choice([1, 2, 8]), dtype=dtype, block_shape=block)


def test_prune_partitions_and_keeps_only_valid_configs(rng: random.Random):
    configs = load_space("wide").expand()
    for _ in range(6):
        shape, M = _random_shape(rng), rng.randint(1, 8192)
        result = prune(configs, shape, M, H200)
        ctx = f"{shape.label} M={M}"
        assert len(result.kept) + result.dropped == len(configs), ctx
        assert set(result.dropped_by_reason) <= set(REASONS), ctx
        kept_set = set(result.kept)
        assert result.kept == [c for c in configs if c in kept_set], ctx  # order kept
        for c in result.kept:
            assert shared_memory_lower_bound(c, shape.dtype) <= H200.shared_memory_bytes, ctx
            if shape.block_shape:
                assert shape.block_shape[1] % c.BLOCK_SIZE_K == 0, ctx  # any BLOCK_SIZE_N: per-column scales
                assert c.BLOCK_SIZE_K <= min(shape.block_shape), ctx  # above: the servers' clamp, a duplicate
            if shape.dtype in (DType.MXFP4, DType.NVFP4):
                assert c.BLOCK_SIZE_K % (32 if shape.dtype is DType.MXFP4 else 16) == 0, ctx
        # Never fewer than every tile the smallest BLOCK_SIZE_M offers that fits in memory.
        assert any(c.BLOCK_SIZE_M == 16 for c in result.kept), ctx


# Winners vLLM ships for Mixtral-8x7B at tp=2 (E=8, N=7168): (M, config) from
# E=8,N=7168,device_name=NVIDIA_H200.json (bf16) and ...NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json.
SHIPPED_WINNERS = [
    (DType.BF16, "NVIDIA H200", 1, Config(16, 128, 128, 64, 4, 5)),
    (DType.BF16, "NVIDIA H200", 2, Config(16, 128, 256, 16, 4, 3)),
    (DType.BF16, "NVIDIA H200", 96, Config(64, 128, 128, 1, 8, 4)),
    (DType.BF16, "NVIDIA H200", 4096, Config(128, 256, 64, 16, 8, 3)),
    (DType.FP8_W8A8, "NVIDIA H100 80GB HBM3", 1, Config(64, 128, 256, 64, 4, 4)),
    (DType.FP8_W8A8, "NVIDIA H100 80GB HBM3", 2, Config(64, 64, 256, 1, 4, 5)),
    (DType.FP8_W8A8, "NVIDIA H100 80GB HBM3", 8, Config(64, 256, 128, 32, 4, 4)),
    (DType.FP8_W8A8, "NVIDIA H100 80GB HBM3", 512, Config(128, 256, 128, 64, 8, 4)),
]


@pytest.mark.parametrize("dtype,device,M,winner", SHIPPED_WINNERS)
def test_shipped_winners_survive_pruning(dtype, device, M, winner):
    shape = MoEShape(E=8, N=7168, K=4096, topk=2, dtype=dtype)
    kept = prune(load_space("default").expand(), shape, M, DeviceLimits.for_device(device)).kept
    assert winner in kept


def test_block_quant_keeps_k_steps_inside_one_block():
    shape = MoEShape(E=256, N=256, K=7168, topk=8, dtype=DType.FP8_W8A8, block_shape=(128, 128))
    kept = prune(load_space("default").expand(), shape, 4096, H200).kept
    # BLOCK_SIZE_N 256 over [128, 128] blocks runs (vLLM's tuner searches it; per-column scales);
    # BLOCK_SIZE_K 256 is what the servers clamp to 128 at launch: the same kernel as 128.
    assert {c.BLOCK_SIZE_N for c in kept} == {32, 64, 128, 256}
    assert {c.BLOCK_SIZE_K for c in kept} == {64, 128}


def test_fp4_block_k_whole_groups():
    configs = [Config(16, 64, bk, 1, 4, 2) for bk in (16, 32, 64)]
    for dtype, kept_bk in ((DType.MXFP4, {32, 64}), (DType.NVFP4, {16, 32, 64}), (DType.BF16, {16, 32, 64})):
        shape = MoEShape(E=8, N=1024, K=1024, topk=2, dtype=dtype)
        result = prune(configs, shape, 64, H200)
        assert {c.BLOCK_SIZE_K for c in result.kept} == kept_bk


def test_block_m_cap_keeps_one_step_above_need():
    shape = MoEShape(E=8, N=1024, K=1024, topk=2, dtype=DType.BF16)
    configs = [Config(bm, 64, 64, 1, 4, 2) for bm in (16, 32, 64, 128, 256)]
    block_ms = lambda M: [c.BLOCK_SIZE_M for c in prune(configs, shape, M, H200).kept]  # noqa: E731
    assert block_ms(1) == [16, 32, 64, 128]  # 64-row MMA floor, plus one step
    assert block_ms(64) == [16, 32, 64, 128]
    assert block_ms(65) == [16, 32, 64, 128, 256]  # 128 covers 65 rows; 256 is the margin step
    assert block_ms(4096) == [16, 32, 64, 128, 256]


def test_tile_vs_warps_keeps_the_fewest_warps():
    shape = MoEShape(E=8, N=1024, K=1024, topk=2, dtype=DType.BF16)
    small = Config(16, 16, 64, 1, 4, 2)  # 256 outputs
    configs = [replace(small, num_warps=w) for w in (2, 4, 8, 16)]
    result = prune(configs, shape, 16, H200)
    assert [c.num_warps for c in result.kept] == [2, 4, 8]  # 16 warps = 512 threads > 256 outputs
    assert result.dropped_by_reason == {"tile_vs_warps": 1}
    alone = prune([replace(small, num_warps=16)], shape, 16, H200)
    assert len(alone.kept) == 1  # the fewest warps the space offers always stays


def test_prune_counts_reasons_once_each():
    shape = MoEShape(E=8, N=1024, K=1024, topk=2, dtype=DType.FP8_W8A8, block_shape=(128, 128))
    huge = Config(256, 256, 256, 1, 8, 5)  # breaks block quant and shared memory: counted once, first rule
    assert prune([huge], shape, 1, H200).dropped_by_reason == {"block_quant": 1}
