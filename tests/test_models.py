"""Model configs → ModelSpec → MoEShape, for every supported family, layouts and refusals."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tuner.errors import UsageError
from tuner.models import ModelSpec, derive_shape, load_model, parse_config, preset_names
from workers.records import DType, MoEShape

FIXTURES = Path(__file__).parent / "fixtures"

# (fixture, model_type, hidden, per-expert intermediate, routed experts, top-k, shared experts,
#  natural dtype, block shape) — the published config.json values.
FAMILIES = [
    ("mixtral-8x7b", "mixtral", 4096, 14336, 8, 2, 0, DType.BF16, None),
    ("qwen2-57b-a14b", "qwen2_moe", 3584, 2560, 64, 8, 1, DType.BF16, None),
    ("qwen3-30b-a3b", "qwen3_moe", 2048, 768, 128, 8, 0, DType.BF16, None),
    ("qwen3-vl-30b-a3b", "qwen3_vl_moe_text", 2048, 768, 128, 8, 0, DType.BF16, None),
    ("deepseek-v2-lite", "deepseek_v2", 2048, 1408, 64, 6, 2, DType.BF16, None),
    ("deepseek-v3", "deepseek_v3", 7168, 2048, 256, 8, 1, DType.FP8_W8A8, (128, 128)),
    ("dbrx", "dbrx", 6144, 10752, 16, 4, 0, DType.BF16, None),
    ("jamba", "jamba", 4096, 14336, 16, 2, 0, DType.BF16, None),
    ("llama-4-scout", "llama4_text", 5120, 8192, 16, 1, 1, DType.BF16, None),
    ("gpt-oss-120b", "gpt_oss", 2880, 2880, 128, 4, 0, DType.MXFP4, None),
    ("glm-4.5", "glm4_moe", 5120, 1536, 160, 8, 1, DType.BF16, None),
]


@pytest.mark.parametrize("fixture,model_type,hidden,inter,experts,topk,shared,dtype,block", FAMILIES)
def test_fixture_reads_as_published(fixture, model_type, hidden, inter, experts, topk, shared, dtype, block):
    spec = load_model(str(FIXTURES / f"{fixture}.json"))
    assert spec == ModelSpec(
        name=fixture, model_type=model_type, hidden_size=hidden, intermediate_size=inter,
        num_experts=experts, top_k=topk, n_shared_experts=shared, natural_dtype=dtype,
        block_shape=block, quant_method={"deepseek-v3": "fp8", "gpt-oss-120b": "mxfp4"}.get(fixture),
        architecture=json.loads((FIXTURES / f"{fixture}.json").read_text())["architectures"][0],
    )


@pytest.mark.parametrize("fixture", sorted({f[0] for f in FAMILIES} & set(preset_names())))
def test_preset_matches_fixture(fixture):
    from_preset = load_model(fixture.upper())  # preset names are case-insensitive
    assert from_preset.name == fixture
    assert replace(from_preset, name="x") == replace(load_model(str(FIXTURES / f"{fixture}.json")), name="x")


def test_every_preset_derives_a_shape():
    for name in preset_names():
        shape = derive_shape(load_model(name))
        assert shape.E >= shape.topk >= 1 and shape.N > 0 and shape.K > 0


def test_tensor_parallel_splits_n():
    spec = load_model(str(FIXTURES / "mixtral-8x7b.json"))
    assert derive_shape(spec, tp=2, dtype="fp8_w8a8") == MoEShape(8, 7168, 4096, 2, DType.FP8_W8A8)
    assert derive_shape(spec, tp=8) == MoEShape(8, 1792, 4096, 2, DType.BF16)


def test_expert_parallel_splits_experts_then_n():
    spec = load_model(str(FIXTURES / "qwen3-30b-a3b.json"))
    # vLLM --enable-expert-parallel on 8 GPUs: experts split, N whole.
    assert derive_shape(spec, tp=8, ep=8) == MoEShape(16, 768, 2048, 8, DType.BF16, ep=8)
    # SGLang --tp 8 --ep 2: experts over 2 groups, N over the 4 GPUs of a group.
    assert derive_shape(spec, tp=8, ep=2) == MoEShape(64, 192, 2048, 8, DType.BF16, ep=2)


def test_dbrx_and_jamba_layouts():
    assert derive_shape(load_model(str(FIXTURES / "dbrx.json")), tp=8) == MoEShape(16, 1344, 6144, 4, DType.BF16)
    assert derive_shape(load_model(str(FIXTURES / "jamba.json")), tp=8) == MoEShape(16, 1792, 4096, 2, DType.BF16)


def test_block_quant_model_keeps_its_blocks():
    spec = load_model(str(FIXTURES / "deepseek-v3.json"))
    shape = derive_shape(spec, tp=8)
    assert shape == MoEShape(256, 256, 7168, 8, DType.FP8_W8A8, (128, 128))
    assert derive_shape(spec, tp=8, dtype="fp8_w8a8") == shape
    assert derive_shape(spec, tp=8, dtype="bf16").block_shape is None
    with pytest.raises(UsageError, match="block shape"):
        derive_shape(spec, tp=32)  # N = 64 per GPU cannot hold 128-row weight blocks


def test_explicit_block_shape_only_for_fp8():
    spec = load_model(str(FIXTURES / "mixtral-8x7b.json"))
    assert derive_shape(spec, tp=2, dtype="fp8_w8a8", block_shape=[128, 128]).block_shape == (128, 128)
    with pytest.raises(UsageError, match="fp8_w8a8 only"):
        derive_shape(spec, dtype="bf16", block_shape=(128, 128))


def test_mxfp4_is_padded_as_the_servers_pad_it_and_nvfp4_needs_whole_groups():
    spec = load_model(str(FIXTURES / "gpt-oss-120b.json"))
    assert derive_shape(spec, tp=1, device_name="NVIDIA H200") == MoEShape(128, 2880, 2880, 4, DType.MXFP4)
    # triton_kernels on Hopper (vLLM's and SGLang's rule): N up to a multiple of 64, K as it is
    assert derive_shape(spec, tp=4, device_name="NVIDIA H200").N == 768
    assert derive_shape(spec, tp=2, device_name="NVIDIA H100 80GB HBM3").N == 1472
    # Marlin (Ampere) and FlashInfer (B200): N to a multiple of 128, K of 256
    a100 = derive_shape(spec, tp=4, device_name="NVIDIA A100-SXM4-80GB")
    assert (a100.N, a100.K) == (768, 3072)
    # no GPU named: vLLM's emulation rule, the OCP MX block (32)
    assert derive_shape(spec, tp=4).N == 736
    assert derive_shape(spec, tp=4, dtype="nvfp4").N == 720  # 720 = 45 groups of 16
    with pytest.raises(UsageError, match="multiples of 16"):
        derive_shape(spec, tp=32, dtype="nvfp4")  # N = 90


@pytest.mark.parametrize("tp,ep,message", [
    (3, 1, "does not split over tp/ep=3"),
    (4, 3, "must divide"),
    (0, 1, "at least 1"),
])
def test_indivisible_layouts_refused(tp, ep, message):
    spec = load_model(str(FIXTURES / "mixtral-8x7b.json"))
    with pytest.raises(UsageError, match=message):
        derive_shape(spec, tp=tp, ep=ep)


def test_experts_not_splitting_over_ep_refused():
    with pytest.raises(UsageError, match="160 experts do not split over ep=3"):
        derive_shape(load_model(str(FIXTURES / "glm-4.5.json")), tp=3, ep=3)


def test_dense_model_refused():
    with pytest.raises(UsageError, match="no MoE layers"):
        load_model(str(FIXTURES / "llama-3-8b.json"))


def test_folder_and_config_json_name_the_model(tmp_path):
    folder = tmp_path / "My-MoE"
    folder.mkdir()
    (folder / "config.json").write_text((FIXTURES / "jamba.json").read_text())
    assert load_model(str(folder)).name == "My-MoE"
    assert load_model(str(folder / "config.json")).name == "My-MoE"


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": "wide", "intermediate_size": 64}',
     "hidden_size"),
    ('{"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64}', "hidden size"),
    ('{"num_local_experts": 2, "num_experts_per_tok": 4, "hidden_size": 64, "intermediate_size": 64}',
     "exceeds the 2 experts"),
])
def test_malformed_configs_give_one_line(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        load_model(str(path))
    assert "\n" not in str(info.value)


def test_missing_model_names_the_presets():
    with pytest.raises(UsageError, match="mixtral-8x7b") as info:
        load_model("no/such-model-anywhere")
    assert "\n" not in str(info.value)


def test_folder_without_config_refused(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        load_model(str(tmp_path))


def test_unsupported_quantization_needs_explicit_dtype(tmp_path):
    raw = json.loads((FIXTURES / "mixtral-8x7b.json").read_text())
    raw["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    path = tmp_path / "awq.json"
    path.write_text(json.dumps(raw))
    spec = load_model(str(path))
    assert spec.natural_dtype is None
    with pytest.raises(UsageError, match="pass --dtype"):
        derive_shape(spec)
    assert derive_shape(spec, dtype="bf16").dtype is DType.BF16


def test_fp16_checkpoint_is_fp16(tmp_path):
    raw = json.loads((FIXTURES / "mixtral-8x7b.json").read_text())
    raw["torch_dtype"] = "float16"
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(raw))
    assert load_model(str(path)).natural_dtype is DType.FP16


def test_repo_id_resolves_from_hf_cache_layout(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # read the cache layout directly
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--Tiny-MoE"
    old, pinned = repo / "snapshots" / "aaaa", repo / "snapshots" / "bbbb"
    old.mkdir(parents=True)
    pinned.mkdir(parents=True)
    (old / "config.json").write_text((FIXTURES / "jamba.json").read_text())
    (pinned / "config.json").write_text((FIXTURES / "dbrx.json").read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb\n")
    spec = load_model("acme/Tiny-MoE")
    assert (spec.name, spec.model_type) == ("acme/Tiny-MoE", "dbrx")  # the revision refs/main names


def test_random_layouts_either_shard_exactly_or_refuse(rng: random.Random):
    for _ in range(200):
        spec = load_model(rng.choice(preset_names()))
        tp = rng.choice([1, 2, 3, 4, 6, 8, 16, 32])
        ep = rng.choice([d for d in range(1, tp + 1) if tp % d == 0] + [rng.randint(1, 8)])
        try:
            shape = derive_shape(spec, tp=tp, ep=ep)
        except UsageError:
            continue
        assert shape.E * ep == spec.num_experts, f"{spec.name} tp={tp} ep={ep}"
        if shape.dtype is DType.MXFP4:  # padded as the servers pad it (never by a whole 32-group or more)
            assert 0 <= shape.N * (tp // ep) - spec.intermediate_size < 32 * (tp // ep), f"{spec.name} tp={tp}"
        else:
            assert shape.N * (tp // ep) == spec.intermediate_size, f"{spec.name} tp={tp} ep={ep}"
        assert (shape.K, shape.topk) == (spec.hidden_size, spec.top_k)


def test_a_checkpoint_block_no_kernel_tile_divides_is_refused() -> None:
    """A ``weight_block_size`` the kernel cannot tile (each must be a multiple of 16) is refused
    as ``--block-shape`` and a job spec's ``block_shape`` are, not tuned into an empty search."""
    raw = {"hidden_size": 64, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
           "quantization_config": {"quant_method": "fp8", "weight_block_size": [8, 8]}}
    spec = parse_config(raw, "m", "m")
    with pytest.raises(UsageError, match=r"checkpoint's fp8 weight block: expected \[block_n, block_k\]"):
        derive_shape(spec)
    assert derive_shape(spec, dtype="bf16").block_shape is None


@pytest.mark.parametrize("quantization", [
    {"quant_method": "gptq", "bits": 4, "group_size": -5},
    {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": -3}}}},
])
def test_an_int4_group_size_that_is_no_size_is_a_malformed_config(quantization) -> None:
    raw = {"hidden_size": 64, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
           "quantization_config": quantization}
    with pytest.raises(UsageError, match=r"^m: malformed config.json: .*group size -\d: expected a positive size"):
        parse_config(raw, "m", "m")
