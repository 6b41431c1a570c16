"""Every model and server convention in the field: configs that name MoE quantities differently,
SGLang's fused shared expert, expert parallelism, SGLang's folder order, partial files.

Config fixtures are written from the models' published ``config.json`` field names and values
(only the fields that matter); ``fixtures/cases/`` holds the configs of the public bug reports
behind these kinds (from ``../shared/cases``), checked end to end through ``moe-tune plan``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner import cli
from tuner.errors import UsageError
from tuner.models import derive_shape, parse_config, sglang_fused_shared_experts
from tuner.plan import build_plan
from tuner.writers import (key_coverage, lookup, partial_file_warnings, server_file,
                           write_vllm)
from workers.records import Config, DType, MoEShape

CASES = Path(__file__).parent / "fixtures" / "cases"

GEMMA4_26B = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
              "text_config": {"model_type": "gemma4_text", "hidden_size": 2816, "enable_moe_block": True,
                              "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704,
                              "intermediate_size": 2112}}
HUNYUAN_A13B = {"architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan_v1_moe", "hidden_size": 4096,
                "intermediate_size": 3072, "num_experts": 64, "moe_topk": [8] * 32,
                "moe_intermediate_size": [3072] * 32, "num_shared_expert": [1] * 32, "use_mixed_mlp_moe": True}
HY3 = {"architectures": ["HYV3ForCausalLM"], "model_type": "hy_v3", "hidden_size": 4096, "intermediate_size": 13312,
       "expert_hidden_dim": 1536, "num_experts": 192, "num_experts_per_tok": 8, "num_shared_experts": 1,
       "first_k_dense_replace": 1}
ERNIE45_21B = {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_size": 2560,
               "intermediate_size": 12288, "moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536,
               "moe_num_shared_experts": 2, "moe_layer_start_index": 1}
STEP3_TEXT = {"architectures": ["Step3VLForConditionalGeneration"], "model_type": "step3_vl",
              "text_config": {"model_type": "step3_text", "hidden_size": 7168, "intermediate_size": 18432,
                              "moe_num_experts": 48, "moe_top_k": 3, "moe_intermediate_size": 5120,
                              "share_expert_dim": 5120}}
QWEN3_UNDER_LLM_CONFIG = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
                          "llm_config": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                                         "moe_intermediate_size": 768, "num_experts": 128,
                                         "num_experts_per_tok": 8}}
NEMOTRON_H_LATENT = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "hidden_size": 4096,
                     "n_routed_experts": 512, "num_experts_per_tok": 22, "moe_intermediate_size": 2688,
                     "moe_latent_size": 1024, "n_shared_experts": 1, "moe_shared_expert_intermediate_size": 5376,
                     "mlp_hidden_act": "relu2"}
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
               "n_shared_experts": 1, "num_experts_per_tok": 8,
               "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
KIMI_K2 = {**DEEPSEEK_V3, "model_type": "kimi_k2", "n_routed_experts": 384}
GLM45 = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 5120,
         "intermediate_size": 12288, "moe_intermediate_size": 1536, "n_routed_experts": 160, "n_shared_experts": 1,
         "num_experts_per_tok": 8}


def spec_of(raw):
    return parse_config(raw, "m", "config.json")


@pytest.mark.parametrize("raw,tp,expected,sources", [
    (GEMMA4_26B, 2, (128, 352, 2816, 8),
     ("text_config.num_experts", "text_config.moe_intermediate_size", "text_config.hidden_size",
      "text_config.top_k_experts")),
    (HUNYUAN_A13B, 2, (64, 1536, 4096, 8), ("num_experts", "moe_intermediate_size", "hidden_size", "moe_topk")),
    (HY3, 8, (192, 192, 4096, 8), ("num_experts", "expert_hidden_dim", "hidden_size", "num_experts_per_tok")),
    (HY3, 4, (192, 384, 4096, 8), ("num_experts", "expert_hidden_dim", "hidden_size", "num_experts_per_tok")),
    (ERNIE45_21B, 1, (64, 1536, 2560, 6), ("moe_num_experts", "moe_intermediate_size", "hidden_size", "moe_k")),
    (QWEN3_UNDER_LLM_CONFIG, 4, (128, 192, 2048, 8),
     ("llm_config.num_experts", "llm_config.moe_intermediate_size", "llm_config.hidden_size",
      "llm_config.num_experts_per_tok")),
    (NEMOTRON_H_LATENT, 1, (512, 2688, 1024, 22),
     ("n_routed_experts", "moe_intermediate_size", "moe_latent_size", "num_experts_per_tok")),
])
def test_shapes_from_configs_that_name_things_differently(raw, tp, expected, sources):
    spec = spec_of(raw)
    shape = derive_shape(spec, tp=tp)
    assert (shape.E, shape.N, shape.K, shape.topk) == expected
    assert tuple(spec.source(q) for q in ("E", "N", "K", "top-k")) == sources


def test_step3_refused_for_a_moe_field_not_understood():
    # Step3's shared expert width ``share_expert_dim`` is not a field read here: refuse, not guess.
    with pytest.raises(UsageError, match="share_expert_dim") as info:
        spec_of(STEP3_TEXT)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("field", ["moe_ffn_hidden_size", "expert_ffn_dim", "num_moe_experts_per_token"])
def test_unknown_moe_size_fields_refused_not_read_from_a_dense_field(field):
    raw = {"model_type": "x", "hidden_size": 1024, "intermediate_size": 8192, "num_experts": 16,
           "num_experts_per_tok": 2, field: 512}
    with pytest.raises(UsageError, match=f"MoE field {field}=512 is not understood"):
        spec_of(raw)


def test_unknown_moe_field_exits_2_in_one_line(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HY3, "expert_hidden_dim": None, "routed_expert_dim": 1536}))
    assert cli.main(["plan", "--model", str(path), "--tp", "8", "--device-name", "NVIDIA H20"]) == 2
    err = capsys.readouterr().err.strip()
    assert "routed_expert_dim" in err and "\n" not in err


def test_per_layer_lists_that_differ_give_one_job_per_shape():
    raw = {**HUNYUAN_A13B, "moe_topk": [8] * 16 + [4] * 16, "moe_intermediate_size": [3072] * 16 + [1536] * 16}
    spec = spec_of(raw)
    assert [(s.name, s.intermediate_size, s.top_k) for s in spec.layer_specs()] == [
        ("m layers 0-15", 3072, 8), ("m layers 16-31", 1536, 4)]
    plan = build_plan([spec], 2, 1, None, None, [1], "default", "NVIDIA H200", formats="vllm")
    assert [job.file_name for job in plan.jobs] == ["E=64,N=1536,device_name=NVIDIA_H200.json",
                                                    "E=64,N=768,device_name=NVIDIA_H200.json"]
    assert [job.shape.topk for job in plan.jobs] == [8, 4]


def test_per_layer_lists_of_different_lengths_refused():
    with pytest.raises(UsageError, match="different lengths"):
        spec_of({**HUNYUAN_A13B, "moe_topk": [8] * 31})


def test_non_gated_experts_with_another_activation_refused():
    with pytest.raises(UsageError, match="mlp_hidden_act='silu'"):
        spec_of({**NEMOTRON_H_LATENT, "mlp_hidden_act": "silu"})


def test_non_gated_experts_keep_the_file_name():
    shape = derive_shape(spec_of(NEMOTRON_H_LATENT), tp=2)
    assert not shape.gated and shape.up_rows == shape.N == 1344
    plan = build_plan([spec_of(NEMOTRON_H_LATENT)], 2, 1, None, None, [1], "default", "NVIDIA H200",
                      formats="vllm")
    assert plan.jobs[0].file_name == "E=512,N=1344,device_name=NVIDIA_H200.json"


@pytest.mark.parametrize("raw,ep,enabled,fused", [
    (DEEPSEEK_V3, 1, True, 1),
    (DEEPSEEK_V3, 1, False, 0),   # --disable-shared-experts-fusion
    (DEEPSEEK_V3, 8, True, 0),    # SGLang turns fusion off under EP on NVIDIA GPUs
    (GLM45, 1, True, 1),
    (KIMI_K2, 1, True, 0),        # SGLang 0.5.10 fuses DeepseekV3ForCausalLM only with 256 routed experts
    ({**DEEPSEEK_V3, "architectures": ["DeepseekV32ForCausalLM"]}, 1, True, 0),
    (HY3, 1, True, 0),
])
def test_sglang_shared_expert_fusion_follows_sglangs_rules(raw, ep, enabled, fused):
    assert sglang_fused_shared_experts(spec_of(raw), ep, enabled)[0] == fused


def test_sglang_layout_plans_e_plus_shared_and_vllm_does_not():
    plan = build_plan([spec_of(DEEPSEEK_V3)], 8, 1, None, None, [1, 64], "default", "NVIDIA H200")
    by_server = {job.servers: job for job in plan.jobs}
    vllm, sglang = by_server[("vllm",)], by_server[("sglang",)]
    assert (vllm.shape.E, vllm.shape.topk, vllm.sglang_file_name) == (256, 8, None)
    assert vllm.file_name == "E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    assert (sglang.shape.E, sglang.shape.topk, sglang.shape.fused_shared, sglang.file_name) == (257, 9, 1, None)
    assert sglang.sglang_file_name == "E=257,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json"
    glm = build_plan([spec_of(GLM45)], 8, 1, ["fp8_w8a8"], None, [1], "default", "NVIDIA H200", formats="sglang")
    assert glm.jobs[0].sglang_file_name == "E=161,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"
    off = build_plan([spec_of(DEEPSEEK_V3)], 8, 1, None, None, [1], "default", "NVIDIA H200", formats="both",
                     fuse_shared_experts=False)
    assert [(job.shape.E, job.servers) for job in off.jobs] == [(256, ("vllm", "sglang"))]


def test_ep_plan_says_the_layout_and_the_load():
    qwen3 = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
             "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8}
    plan = build_plan([spec_of(qwen3)], 8, 8, None, None, [64], "default", "NVIDIA H200", formats="vllm")
    (job,) = plan.jobs
    assert (job.shape.E, job.shape.N, job.shape.ep, job.shape.pairs_per_token) == (16, 1536, 8, 1.0)
    assert any("TP+EP" in note and "M*8/8" in note for note in job.notes)


def test_sglang_folders_by_version_number_after_the_running_one():
    shape = MoEShape(8, 1792, 4096, 2, DType.BF16)
    name = "E=8,N=1792,device_name=NVIDIA_H200.json"
    files = {f"triton_{v}/{name}": {1: Config(16, 32, 64, 1, 4, i)} for i, v in
             enumerate(("3_1_0", "3_10_0", "3_9_0", "3_4_0"), start=1)}
    assert server_file(files, shape, "NVIDIA H200")[0] == f"triton_3_10_0/{name}"
    assert server_file(files, shape, "NVIDIA H200", "3.4.0")[0] == f"triton_3_4_0/{name}"
    assert server_file(files, shape, "NVIDIA H200", "3.11.0")[0] == f"triton_3_10_0/{name}"


def test_server_file_keeps_to_the_named_servers_lookup():
    """A folder holding both layouts: vLLM reads only its flat file, SGLang only its triton_X_Y_Z folders."""
    shape = MoEShape(8, 1792, 4096, 2, DType.BF16)
    name = "E=8,N=1792,device_name=NVIDIA_H200.json"
    files = {name: {1: Config(16, 32, 64, 1, 4, 2)}, f"triton_3_1_0/{name}": {1: Config(16, 32, 64, 1, 4, 3)}}
    assert server_file(files, shape, "NVIDIA H200", "3.6.0")[0] == name
    assert server_file(files, shape, "NVIDIA H200", "3.6.0", "vllm")[0] == name
    assert server_file(files, shape, "NVIDIA H200", "3.6.0", "sglang")[0] == f"triton_3_1_0/{name}"
    assert server_file({name: files[name]}, shape, "NVIDIA H200", "3.6.0", "sglang") is None
    assert server_file({f"triton_3_1_0/{name}": files[f"triton_3_1_0/{name}"]}, shape, "NVIDIA H200", "3.6.0",
                       "vllm") is None


def test_key_coverage_matches_the_servers_nearest_key_lookup():
    keys = [1, 4, 16, 64]
    configs = {k: Config(16, 32, 64, 1, 4, i + 1) for i, k in enumerate(keys)}
    spans = key_coverage(keys)
    assert spans == [(1, 1, 2), (4, 3, 10), (16, 11, 40), (64, 41, None)]
    for key, first, last in spans:
        for M in range(first, (last or 200) + 1):
            assert lookup(configs, M) == configs[key]


def test_partial_file_warning_names_the_ranges(tmp_path):
    shape = MoEShape(8, 1792, 4096, 2, DType.BF16)
    path = write_vllm(tmp_path, shape, "NVIDIA H200", {M: Config(16, 32, 64, 1, 4, 2) for M in (1, 64)}, "3.4.0").path
    [warning] = partial_file_warnings([path], (1, 2, 64, 128))
    assert warning.startswith("E=8,N=1792,device_name=NVIDIA_H200.json is partial: it has configs for M=1,64 only, "
                              "none for 2 of the 4 batch sizes servers are tuned for (2, 128)"), warning
    assert "M 1-32 runs the M=1 config, M 33 and above run the M=64 config" in warning
    assert partial_file_warnings([path], (1, 64)) == []


def test_files_tuned_together_share_one_partial_warning(tmp_path):
    """Files holding the same batch sizes are named in one line; a complete file in none."""
    grid = tuple(range(1, 11))
    paths = [write_vllm(tmp_path, MoEShape(8, n, 4096, 2, DType.BF16), "NVIDIA H200",
                        {M: Config(16, 32, 64, 1, 4, 2) for M in keys}, "3.4.0").path
             for n, keys in ((128, (2, 8)), (256, (2, 8)), (512, (4,)), (1024, grid))]
    first, second = partial_file_warnings(paths, grid)
    assert first.startswith(f"{paths[0].name}, {paths[1].name} are partial: they have configs for M=2,8 only, none "
                            "for 8 of the 10 batch sizes servers are tuned for (1, 3, 4, 5, ... 10)"), first
    assert "M 1-5 runs the M=2 config, M 6 and above run the M=8 config" in first
    assert second.startswith(f"{paths[2].name} is partial: it has configs for M=4 only") and "M 1 and above" in second
    assert partial_file_warnings(paths[3:], grid) == []


CASE_NAMES = {
    "gemma4-top_k_experts": (["--tp", "2", "--dtype", "fp8_w8a8", "--device-name", "NVIDIA H100 PCIe"],
                             ["E=128,N=352,device_name=NVIDIA_H100_PCIe,dtype=fp8_w8a8.json"]),
    "hunyuan-a13b-list-fields": (["--tp", "2", "--device-name", "NVIDIA H200"],
                                 ["E=64,N=1536,device_name=NVIDIA_H200.json"]),
    "hy3-expert_hidden_dim": (["--tp", "8", "--device-name", "NVIDIA H20"],
                              ["E=192,N=192,device_name=NVIDIA_H20,dtype=fp8_w8a8.json"]),
    "sglang-dsv3-shared-expert-fusion": (
        ["--tp", "8", "--device-name", "NVIDIA H200", "--format", "sglang"],
        ["E=257,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json"]),
    "ep-local-routing-load": (["--tp", "8", "--ep", "8", "--device-name", "NVIDIA H200", "--format", "vllm"],
                              ["E=16,N=1536,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"]),
}


@pytest.mark.parametrize("case", sorted(CASE_NAMES))
def test_shared_cases_plan_the_right_names(case, capsys):
    args, names = CASE_NAMES[case]
    rc = cli.main(["plan", "--model", str(CASES / f"{case}.json"), *args, "--batch-sizes", "1", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    jobs = json.loads(out)["jobs"]
    assert [job["file_name"] or job["sglang_file_name"] for job in jobs] == names


GLM45_FP8_CHANNEL = {**GLM45, "quantization_config": {
    "quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}}}}


def test_per_channel_fp8_is_natural_and_named_per_server():
    spec = spec_of(GLM45_FP8_CHANNEL)
    assert spec.natural_dtype is DType.FP8_W8A8 and spec.per_channel
    plan = build_plan([spec], 8, 1, None, None, [1], "default", "NVIDIA H200")
    names = {job.servers: (job.file_name, job.sglang_file_name) for job in plan.jobs}
    assert names[("vllm",)][0] == "E=160,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json"
    assert names[("sglang",)][1] == "E=161,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8,per_channel_quant=True.json"
    assert all(job.shape.per_channel for job in plan.jobs)


def test_weight_only_fp8_refused_with_the_reason():
    raw = {**GLM45, "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}, "input_activations": None}}}}
    with pytest.raises(UsageError, match="fp8_w8a16, a Marlin kernel"):
        derive_shape(spec_of(raw))
