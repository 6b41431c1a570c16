"""The ``--kernel vllm|sglang`` adapter contract, on CPU, against the stand-ins in
tests/stand_in_servers (the real packages need a GPU): the candidate config is forced through
``override_config`` for exactly the call, weights/routing/scales reach ``fused_experts`` in the
server's layout, and the result is what the fp32 reference says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers import server_kernels
from workers.problem import ERROR_BOUNDS, build_problem, rel_error
from workers.records import Config, DType, MoEShape

STAND_INS = Path(__file__).parent / "stand_in_servers"
CONFIG = Config(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.syspath_prepend(str(STAND_INS))
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "sglang", "stand_in_moe_math")]:
        del sys.modules[name]


def problem(dtype: DType, seed: int, block_shape=None, M: int = 5):
    shape = MoEShape(E=4, N=64, K=128, topk=2, dtype=dtype, block_shape=block_shape)
    return build_problem(shape, M, seed=seed)


def stand_in_calls(kind: str) -> list[dict]:
    module = ("vllm.model_executor.layers.fused_moe.fused_moe" if kind == "vllm"
              else "sglang.srt.layers.moe.moe_runner.triton_utils")
    return sys.modules[module].CALLS


@pytest.mark.parametrize("kind", server_kernels.SERVER_KERNELS)
@pytest.mark.parametrize("dtype", [DType.BF16, DType.INT8_W8A16])
def test_config_is_forced_and_result_matches_the_reference(kind, dtype, stand_ins, seed):
    kernel = server_kernels.load(kind)
    p = problem(dtype, seed)
    runner = kernel.runner(p, CONFIG)
    runner.output.fill_(float("nan"))
    runner.run()
    call = stand_in_calls(kind)[-1]
    assert call["config"] == CONFIG.to_dict()
    assert call["inplace"] is False, "an in-place call would overwrite the inputs between timed runs"
    assert kernel.override.__module__.startswith(kind) and kernel.fused_experts.__module__.startswith(kind)
    assert sys.modules[kernel.override.__module__].get_config() is None, "override must end with the call"
    assert rel_error(runner.output, p.reference) <= ERROR_BOUNDS[dtype]
    env = kernel.describe()
    assert env["kernel_version"] == f"{kind} 0.0.0+stand-in" and len(env["kernel_hash"]) == 16


@pytest.mark.parametrize("block_shape", [None, (64, 64)])
def test_fp8_scales_and_block_shape_reach_the_server(block_shape, stand_ins, seed):
    p = problem(DType.FP8_W8A8, seed, block_shape)
    server_kernels.load("vllm").runner(p, CONFIG).run()
    quant = stand_in_calls("vllm")[-1]["quant_config"]
    assert quant.quant_dtype == torch.float8_e4m3fn
    assert quant.w1_scale is p.w13.scale and quant.w2_scale is p.w2.scale
    assert quant.a1_scale is None and quant.a2_scale is None, "activation scales are dynamic, as in the reference"
    assert quant.block_shape == (list(block_shape) if block_shape else None)

    server_kernels.load("sglang").runner(p, CONFIG).run()
    call = stand_in_calls("sglang")[-1]
    assert call["use_fp8_w8a8"] and not call["use_int8_w8a16"]
    assert call["w1_scale"] is p.w13.scale and call["block_shape"] == (list(block_shape) if block_shape else None)


def test_unsupported_dtype_and_missing_package(stand_ins, seed, monkeypatch):
    with pytest.raises(ValueError, match="mxfp4"):
        server_kernels.load("vllm").runner(problem(DType.MXFP4, seed), CONFIG)
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(server_kernels.ServerKernelUnavailable, match="--kernel sglang"):
        server_kernels.load("sglang")


def test_worker_measures_the_server_kernel():
    script = (
        "import json\n"
        "from workers.records import Candidate, Config, DType, MoEShape\n"
        "from workers.worker import BenchmarkWorker\n"
        "w = BenchmarkWorker(kernel='vllm', timeout_s=120)\n"
        "m = w.measure(Candidate(MoEShape(4, 64, 64, 2, DType.BF16), 3, Config(16, 32, 64, 1, 4, 3)))\n"
        "print(json.dumps({'env': w.describe(), 'status': m.status.value, 'latency': m.latency_us}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(STAND_INS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == "ok" and report["latency"] > 0
    assert report["env"]["kernel"] == "vllm" and report["env"]["kernel_version"] == "vllm 0.0.0+stand-in"
