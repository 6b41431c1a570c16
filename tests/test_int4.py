"""int4_w4a16 (weight-only 4-bit integers, GPTQ/AWQ/compressed-tensors pack-quantized): quantizer
and dequantizer on spec vectors, the kernel against the fp32 reference, the servers' default
config, file names and natural dtype detection."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated

import pytest
import torch

from tuner.models import derive_shape, parse_config
from tuner.naming import sglang_file_name, vllm_file_name
from workers.default_config import default_config
from workers.moe import MoERunner
from workers.problem import ERROR_BOUNDS, build_problem, rel_error
from workers.quant import dequantize_int4, quantize_int4, quantize_weight
from workers.records import Config, DType, MoEShape

SMALL = Config(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=2)


def test_quantizer_spec_vectors():
    # One row, two groups of 4. Group 0: amax 3.75 → scale 3.75 / 7.5 = 0.5 (exact in bf16); values
    # / scale: 7.5 (half to even → 8, clamped to 7), -7.5 → -8, 2.5 → 2 (half to even), -0.5 → -0.
    # Group 1 all zeros: the floor scale, codes 8 (value 0).
    w = torch.tensor([[3.75, -3.75, 1.25, -0.25, 0.0, 0.0, 0.0, 0.0]])
    packed, scale = quantize_int4(w, 4)
    assert scale.dtype == torch.bfloat16 and scale.shape == (1, 2)
    assert scale[0, 0].item() == 0.5
    low, high = [int(b) & 0xF for b in packed[0]], [int(b) >> 4 for b in packed[0]]
    # Element 2i in the low nibble: elements (0,1) → byte 0, (2,3) → byte 1.
    assert [low[0], high[0], low[1], high[1]] == [7 + 8, -8 + 8, 2 + 8, 0 + 8]
    assert low[2:] + high[2:] == [8, 8, 8, 8]


def test_dequantizer_spec_vectors():
    # Byte 0x0F: low nibble 15 → +7, high nibble 0 → -8; byte 0x88: both 0. Scale 0.5 for group 0.
    packed = torch.tensor([[0x0F, 0x88]], dtype=torch.uint8)
    scale = torch.tensor([[0.5]], dtype=torch.bfloat16)
    assert dequantize_int4(packed, scale, 4).tolist() == [[3.5, -4.0, 0.0, 0.0]]


def test_round_trip_error_is_within_half_a_step():
    w = torch.randn((16, 256), generator=torch.Generator().manual_seed(0))
    packed, scale = quantize_int4(w, 32)
    back = dequantize_int4(packed, scale, 32)
    step = scale.float().repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step * 0.5 + 1e-6 + (w.abs() > 7 * step) * step).all()


def test_quantize_weight_layout():
    q = quantize_weight(torch.randn(2, 8, 64), DType.INT4_W4A16, (0, 32))
    assert q.data.shape == (2, 8, 32) and q.data.dtype == torch.uint8
    assert q.scale.shape == (2, 8, 2) and q.shape == (2, 8, 64) and q.block_shape == (0, 32)
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_weight(torch.randn(1, 8, 48), DType.INT4_W4A16, (0, 32))


@pytest.mark.parametrize("group,K", [(32, 96), (64, 128), (-1, 96)])
def test_kernel_matches_reference(group, K):
    shape = MoEShape(E=4, N=64, K=K, topk=2, dtype=DType.INT4_W4A16, block_shape=(0, group))
    for M, config in ((1, SMALL), (33, Config(16, 64, 64, 1, 4, 2))):
        problem = build_problem(shape, M, seed=M)
        runner = MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids, config)
        runner.poison_buffers()
        assert rel_error(runner.run(), problem.reference) < 1e-2


def test_kernel_with_partial_k_step():
    # K = 96 with BLOCK_SIZE_K 64: the second step holds 32 valid rows of 64 (masked loads).
    shape = MoEShape(E=4, N=64, K=96, topk=2, dtype=DType.INT4_W4A16, block_shape=(0, 32))
    problem = build_problem(shape, 9, seed=1)
    runner = MoERunner(problem.x, problem.w13, problem.w2, problem.topk_weights, problem.topk_ids,
                       Config(16, 32, 64, 1, 4, 2))
    runner.poison_buffers()
    assert rel_error(runner.run(), problem.reference) < ERROR_BOUNDS[DType.INT4_W4A16] / 3


def test_servers_default_config_for_int4():
    shape = MoEShape(E=384, N=256, K=7168, topk=8, dtype=DType.INT4_W4A16, block_shape=(0, 32))
    assert default_config(shape, 1) == Config(16, 32, 64, 1, 4, 3)
    assert default_config(shape, 20) == Config(16, 64, 32, 1, 4, 3)
    assert default_config(shape, 40) == Config(32, 64, 32, 1, 4, 3)
    assert default_config(shape, 4096) == Config(64, 64, 32, 1, 4, 3)


def test_file_names_have_no_block_shape():
    shape = MoEShape(E=384, N=256, K=7168, topk=8, dtype=DType.INT4_W4A16, block_shape=(0, 32))
    assert vllm_file_name(shape, "NVIDIA H200") == "E=384,N=256,device_name=NVIDIA_H200,dtype=int4_w4a16.json"
    assert sglang_file_name(shape, "NVIDIA H200") == "E=384,N=256,device_name=NVIDIA_H200,dtype=int4_w4a16.json"


MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2}


@pytest.mark.parametrize("quant,group,fmt", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}, 128, "gptq int4"),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": True}, -1, "gptq int4"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}, 64,
     "awq int4 (zero points)"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                           "symmetric": True}, "input_activations": None}}}, 32,
     "compressed-tensors pack-quantized int4"),
])
def test_natural_dtype_of_int4_checkpoints(quant, group, fmt):
    spec = parse_config({**MIXTRAL, "quantization_config": quant}, "m", "config.json")
    shape = derive_shape(spec, tp=2)
    assert shape.dtype is DType.INT4_W4A16 and shape.group_size == group
    assert spec.quant_format.startswith(fmt)


def test_int4_needs_whole_groups_per_gpu():
    spec = parse_config({**MIXTRAL, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}},
                        "m", "config.json")
    with pytest.raises(Exception, match="multiples of its group size 128"):
        derive_shape(spec, tp=64)  # N = 224 per GPU
    assert derive_shape(parse_config(MIXTRAL, "m", "c"), tp=2, dtype="int4_w4a16").group_size == 128


def test_check_runs_int4_and_refuses_split_groups(capsys):
    from tuner import cli

    assert cli.main(["check", "--shape", "4,64,64,2", "--dtype", "int4_w4a16", "--group-size", "32",
                     "--batch-sizes", "1,7", "--interpret"]) == 0
    assert "all within bounds" in capsys.readouterr().out
    assert cli.main(["check", "--shape", "4,64,64,2", "--dtype", "int4_w4a16", "--interpret"]) == 2
    assert "group size 128" in capsys.readouterr().err
