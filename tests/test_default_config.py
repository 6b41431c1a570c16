"""The servers' default-config rules: moe-tune's encodings against values read from each
version's source, the pre-#34846 vLLM rule over random shapes, and the server-version mapping."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from workers.default_config import (SGLANG, VLLM, VLLM_PRE_34846, default_config, rule_for_version,
                                     server_default)
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
        assert _tile(default_config(shape, M, VLLM_PRE_34846)) == DECODE, (E, M)
    for M in (E + 1, rng.randint(E + 1, 8 * E), 16 * E):
        assert _tile(default_config(shape, M, VLLM_PRE_34846)) == PREFILL, (E, M)


def test_triton_launch_defaults_are_written_out(rng: random.Random) -> None:
    shape = MoEShape(E=8, N=128, K=128, topk=2, dtype=DType.BF16)
    for M in (1, rng.randint(9, 4096)):
        config = default_config(shape, M, VLLM_PRE_34846)
        assert (config.num_warps, config.num_stages) == (4, 3)


@pytest.mark.parametrize("dtype", [DType.MXFP4, DType.NVFP4])
def test_fp4_defaults_satisfy_the_kernels_k_tile_rule(dtype: DType, rng: random.Random) -> None:
    """The fp4 kernels dequantize whole scale groups per K tile (32 resp. 16 elements)."""
    group = 32 if dtype is DType.MXFP4 else 16
    shape = MoEShape(E=rng.choice([32, 128]), N=2880, K=2880, topk=4, dtype=dtype)
    for M in (1, shape.E + rng.randint(1, 1000)):
        assert default_config(shape, M, VLLM_PRE_34846).BLOCK_SIZE_K % group == 0


def test_block_fp8_tile_follows_the_quantization_block_at_every_batch_size(rng: random.Random) -> None:
    block = (rng.choice([64, 128]), rng.choice([64, 128]))
    shape = MoEShape(E=256, N=256, K=7168, topk=8, dtype=DType.FP8_W8A8, block_shape=block)
    for M in (1, 256, rng.randint(257, 8192)):
        config = default_config(shape, M, VLLM_PRE_34846)
        assert (config.BLOCK_SIZE_M, config.BLOCK_SIZE_N, config.BLOCK_SIZE_K) == (64, block[0], block[1])
        assert config.GROUP_SIZE_M == 32
        assert (config.num_warps, config.num_stages) == (4, 3)


def test_refuses_what_vllm_sends_to_another_kernel_and_bad_batch_sizes() -> None:
    grouped_int8 = MoEShape(E=8, N=128, K=128, topk=2, dtype=DType.INT8_W8A16, block_shape=(128, 128))
    with pytest.raises(ValueError, match="int8_w8a16"):
        default_config(grouped_int8, 16, VLLM)
    with pytest.raises(ValueError, match="batch size"):
        default_config(MoEShape(E=8, N=128, K=128, topk=2, dtype=DType.BF16), 0, SGLANG)


def _shape(dtype: DType, E: int = 8, block=None) -> MoEShape:
    return MoEShape(E=E, N=1024, K=4096, topk=2, dtype=dtype, block_shape=block)


# (dtype, E, block, M) → (BLOCK_SIZE_M, N, K, GROUP_SIZE_M, num_warps, num_stages), worked out by hand
# from vLLM 0.33.0's fused_moe.py get_default_config (CUDA branch).
VLLM_0_33 = [
    (DType.BF16, 8, None, 1, (16, 64, 128, 1, 4, 4)),
    (DType.BF16, 8, None, 48, (32, 64, 128, 1, 4, 3)),
    (DType.BF16, 8, None, 256, (64, 128, 64, 1, 8, 3)),
    (DType.BF16, 8, None, 4096, (128, 128, 64, 16, 8, 3)),
    (DType.BF16, 128, None, 4096, (128, 128, 64, 1, 8, 3)),
    (DType.FP16, 64, None, 128, (64, 128, 64, 1, 4, 3)),
    (DType.FP8_W8A8, 8, None, 96, (32, 128, 128, 1, 4, 3)),
    (DType.FP8_W8A8, 8, None, 256, (64, 128, 128, 1, 8, 3)),
    (DType.INT8_W8A16, 64, None, 32, (16, 64, 128, 1, 4, 4)),
    (DType.FP8_W8A8, 256, (128, 128), 1, (16, 64, 128, 1, 4, 4)),
    (DType.FP8_W8A8, 256, (128, 128), 8, (16, 64, 128, 1, 4, 3)),
    (DType.FP8_W8A8, 256, (128, 128), 16, (16, 128, 128, 1, 4, 3)),
    (DType.FP8_W8A8, 256, (128, 128), 64, (16, 128, 128, 32, 4, 3)),
    (DType.FP8_W8A8, 256, (128, 128), 65, (64, 128, 128, 32, 4, 3)),
    # int4_w4a16 [0, group]: the wna16 branch (BLOCK_SIZE_M, GROUP_SIZE_M) completed by
    # get_moe_wna16_block_config's Triton tile (N 32 / K 64 for one token, else 64 / 32)
    (DType.INT4_W4A16, 8, (0, 128), 1, (16, 32, 64, 1, 4, 3)),
    (DType.INT4_W4A16, 8, (0, 128), 20, (16, 64, 32, 1, 4, 3)),
    (DType.INT4_W4A16, 8, (0, 32), 21, (32, 64, 32, 1, 4, 3)),
    (DType.INT4_W4A16, 384, (0, 32), 4096, (64, 64, 32, 1, 4, 3)),
]
# From SGLang 0.5.10's fused_moe_triton_config.py get_default_config (CUDA, no deterministic mode).
SGLANG_0_5 = [
    (DType.BF16, 8, None, 8, (16, 32, 64, 1, 4, 3)),
    (DType.BF16, 8, None, 9, (64, 64, 32, 8, 4, 3)),
    (DType.FP8_W8A8, 8, None, 8, (64, 128, 128, 1, 4, 4)),
    (DType.FP8_W8A8, 8, None, 9, (128, 256, 128, 32, 8, 4)),
    (DType.FP8_W8A8, 256, (128, 128), 1, (64, 128, 128, 32, 4, 3)),
    (DType.INT4_W4A16, 8, (0, 128), 8, (16, 32, 64, 1, 4, 3)),  # no int4 branch: the non-fp8 rule
    (DType.INT4_W4A16, 8, (0, 128), 9, (64, 64, 32, 8, 4, 3)),
]


def _six(config: Config) -> tuple[int, ...]:
    return (*_tile(config), config.num_warps, config.num_stages)


@pytest.mark.parametrize("dtype,E,block,M,expected", VLLM_0_33)
def test_vllm_batch_aware_rule_matches_vllm_0_33(dtype, E, block, M, expected) -> None:
    assert _six(default_config(_shape(dtype, E, block), M, VLLM)) == expected


@pytest.mark.parametrize("dtype,E,block,M,expected", SGLANG_0_5)
def test_sglang_rule_matches_sglang_0_5(dtype, E, block, M, expected) -> None:
    assert _six(default_config(_shape(dtype, E, block), M, SGLANG)) == expected


@pytest.mark.parametrize("M", [1, 20, 40, 41, 4096])
def test_int4_rule_is_the_same_before_and_after_vllm_34846(M) -> None:
    shape = _shape(DType.INT4_W4A16, 8, (0, 128))
    assert default_config(shape, M, VLLM_PRE_34846) == default_config(shape, M, VLLM)


def test_server_version_picks_the_rule() -> None:
    assert rule_for_version("vllm==0.33.0") == VLLM and rule_for_version("vllm==1.2") == VLLM
    assert rule_for_version("sglang==0.5.10.post1") == SGLANG
    assert rule_for_version(VLLM_PRE_34846) == VLLM_PRE_34846
    with pytest.raises(ValueError, match="not recorded here"):
        rule_for_version("vllm==0.20.1")
    with pytest.raises(ValueError, match="expected one of"):
        rule_for_version("trtllm==1.0")


def test_without_the_servers_code_the_encoding_serves_and_says_so(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sglang", None)
    from workers import default_config as module

    monkeypatch.setattr(module, "_found", {})
    config, source = server_default(_shape(DType.BF16), 9, SGLANG)
    assert _six(config) == (64, 64, 32, 8, 4, 3)
    assert source.label == "sglang default rule (moe-tune encoding)"


def test_encoding_agrees_with_the_imported_vllm_function() -> None:
    """With vLLM's extracted sources (MOE_TUNE_VLLM_SOURCES, a folder; skipped otherwise, as in
    CI): ``server_default`` calls vLLM's own ``get_default_config``, and it equals the encoding."""
    sources = os.environ.get("MOE_TUNE_VLLM_SOURCES")
    if not sources or not Path(sources).is_dir():
        pytest.skip("MOE_TUNE_VLLM_SOURCES (a folder of vLLM's extracted Python files) not set")
    script = (
        "from workers.default_config import VLLM, default_config, server_default\n"
        "from workers.records import DType, MoEShape\n"
        "bad, source = [], None\n"
        "for E in (8, 128):\n"
        "    for dtype, block in ((DType.BF16, None), (DType.FP8_W8A8, None), (DType.FP8_W8A8, (128, 128)),\n"
        "                         (DType.INT8_W8A16, None)):\n"
        "        shape = MoEShape(E=E, N=768, K=2048, topk=8, dtype=dtype, block_shape=block)\n"
        "        for M in (1, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512, 1024, 4096, 65536):\n"
        "            config, source = server_default(shape, M, VLLM)\n"
        "            if config != default_config(shape, M, VLLM):\n"
        "                bad.append((E, dtype.value, block, M))\n"
        "print(source.label)\nprint(bad)\n"
    )
    env = {**os.environ, "MOE_TUNE_SERVER_CODE": sources, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    label, bad = done.stdout.strip().splitlines()[-2:]
    if "moe-tune encoding" in label:
        pytest.skip("vLLM's fused-MoE module does not import here (its dependencies are missing)")
    assert "get_default_config, vllm 0." in label
    assert bad == "[]"


def _vllm_get_default_config(M, E, N, K, topk, dtype, block_shape=None):  # vLLM 0.33's signature
    return {"called": dict(M=M, E=E, N=N, K=K, topk=topk, dtype=dtype, block_shape=block_shape)}


def _sglang_get_default_config(M, E, N, K, topk, dtype, is_marlin, block_shape=None):  # SGLang 0.5.10's
    return {"called": dict(M=M, E=E, N=N, K=K, topk=topk, dtype=dtype, is_marlin=is_marlin, block_shape=block_shape)}


@pytest.mark.parametrize("rule, function, extra", [(VLLM, _vllm_get_default_config, {}),
                                                   (SGLANG, _sglang_get_default_config, {"is_marlin": False})])
def test_each_rule_calls_its_servers_own_function_as_that_server_does(rule, function, extra, monkeypatch) -> None:
    """With the server's code importable (here a module holding a function of that server
    version's signature), ``server_default`` calls it with the server's arguments and names it;
    vLLM's own function is not used for int4_w4a16 nor from a vLLM older than the ``vllm`` rule."""
    import dataclasses
    import types

    from workers import default_config as module
    from workers.backends import server_code

    calls = []

    def get_default_config(*args):
        calls.append(function(*args)["called"])
        return {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1}

    own = module._RULES[rule]
    fake = types.SimpleNamespace(get_default_config=get_default_config)
    monkeypatch.setitem(module._RULES, rule, dataclasses.replace(own, server=dataclasses.replace(
        own.server, load=lambda name: fake)))
    version = "0.33.0"
    monkeypatch.setattr(server_code, "version", lambda package: version)
    monkeypatch.setattr(module, "_found", {})
    shape = MoEShape(E=8, N=768, K=2048, topk=2, dtype=DType.FP8_W8A8, block_shape=(128, 128))
    config, source = server_default(shape, 48, rule)
    assert calls == [dict(M=48, E=8, N=768, K=2048, topk=2, dtype="fp8_w8a8", block_shape=[128, 128], **extra)]
    assert config == Config(32, 64, 128, 1, 4, 3)  # Triton's launch defaults complete the dict
    assert source.implementation == f"{own.server.module}.get_default_config, {rule} {version}"

    int4 = MoEShape(E=8, N=768, K=2048, topk=2, dtype=DType.INT4_W4A16, block_shape=(0, 128))
    _, source = server_default(int4, 48, rule)
    assert (source.implementation == "moe-tune encoding") is (rule == VLLM)
    monkeypatch.setattr(module, "_found", {})
    version = "0.32.1"
    _, source = server_default(shape, 48, rule)
    assert (source.implementation == "moe-tune encoding") is (rule == VLLM)
