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
LEGACY = STAND_INS / "legacy"
CONFIG = Config(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
FORMS = ("current", "legacy")
"""Call forms: vLLM ``quant_config=`` / ``use_fp8_w8a8=…`` keywords; SGLang ``topk_output`` with
``MoeRunnerConfig`` (``moe_runner.triton_utils``) / ``topk_weights, topk_ids`` (``fused_moe_triton``)."""
ENTRY_MODULES = {("vllm", "current"): "vllm.model_executor.layers.fused_moe.fused_moe",
                 ("vllm", "legacy"): "vllm.model_executor.layers.fused_moe.fused_moe",
                 ("sglang", "current"): "sglang.srt.layers.moe.moe_runner.triton_utils",
                 ("sglang", "legacy"): "sglang.srt.layers.moe.fused_moe_triton"}


def _forget_stand_ins() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in ("vllm", "sglang", "stand_in_moe_math")]:
        del sys.modules[name]


@pytest.fixture(params=FORMS)
def stand_ins(request, monkeypatch):
    """The stand-in servers of one call form on ``sys.path``; yields the form."""
    _forget_stand_ins()
    monkeypatch.syspath_prepend(str(STAND_INS))  # stand_in_moe_math, and the current servers
    if request.param == "legacy":
        monkeypatch.syspath_prepend(str(LEGACY))  # shadows the current servers
    yield request.param
    _forget_stand_ins()


def problem(dtype: DType, seed: int, block_shape=None, M: int = 5):
    shape = MoEShape(E=4, N=64, K=128, topk=2, dtype=dtype, block_shape=block_shape)
    return build_problem(shape, M, seed=seed)


def stand_in_calls(kind: str, form: str) -> list[dict]:
    return sys.modules[ENTRY_MODULES[(kind, form)]].CALLS


@pytest.mark.parametrize("kind", server_kernels.SERVER_KERNELS)
@pytest.mark.parametrize("dtype,block_shape", [(DType.BF16, None), (DType.INT8_W8A16, None), (DType.FP8_W8A8, None),
                                               (DType.FP8_W8A8, (64, 64))])
def test_config_is_forced_and_result_matches_the_reference(kind, dtype, block_shape, stand_ins, seed):
    kernel = server_kernels.load(kind)
    assert kernel.fused_experts.__module__ == ENTRY_MODULES[(kind, stand_ins)]
    p = problem(dtype, seed, block_shape)
    runner = kernel.runner(p, CONFIG)
    runner.output.fill_(float("nan"))
    runner.run()
    call = stand_in_calls(kind, stand_ins)[-1]
    assert call["config"] == CONFIG.to_dict()
    assert call["inplace"] is False, "an in-place call would overwrite the inputs between timed runs"
    assert kernel.override.__module__.startswith(kind)
    assert sys.modules[kernel.override.__module__].get_config() is None, "override must end with the call"
    assert rel_error(runner.output, p.reference) <= ERROR_BOUNDS[dtype]
    env = kernel.describe()
    version = "0.0.0+stand-in" if stand_ins == "current" else "0.0.0+stand-in-legacy"
    assert env["kernel_version"] == f"{kind} {version}" and len(env["kernel_hash"]) == 16


@pytest.mark.parametrize("kind", server_kernels.SERVER_KERNELS)
@pytest.mark.parametrize("dtype,block_shape", [(DType.FP8_W8A8, None), (DType.FP8_W8A8, (64, 64)),
                                               (DType.INT8_W8A16, None)])
def test_scales_and_block_shape_reach_the_server(kind, dtype, block_shape, stand_ins, seed):
    p = problem(dtype, seed, block_shape)
    server_kernels.load(kind).runner(p, CONFIG).run()
    call = stand_in_calls(kind, stand_ins)[-1]
    block = list(block_shape) if block_shape else None
    if "quant_config" in call:  # vLLM's current form
        quant = call["quant_config"]
        assert quant.quant_dtype == (torch.float8_e4m3fn if dtype is DType.FP8_W8A8 else torch.int8)
        assert quant.w1_scale is p.w13.scale and quant.w2_scale is p.w2.scale
        assert quant.a1_scale is None and quant.a2_scale is None, "activation scales are dynamic, as in the reference"
        assert quant.block_shape == block
        return
    assert call["use_fp8_w8a8"] == (dtype is DType.FP8_W8A8)
    assert call["use_int8_w8a16"] == (dtype is DType.INT8_W8A16)
    assert call["w1_scale"] is p.w13.scale and call["w2_scale"] is p.w2.scale
    assert call.get("a1_scale") is None
    assert call["block_shape"] == block


@pytest.mark.parametrize("kind", server_kernels.SERVER_KERNELS)
def test_unsupported_dtype_and_missing_package(kind, stand_ins, seed, monkeypatch):
    with pytest.raises(ValueError, match="mxfp4"):
        server_kernels.load(kind).runner(problem(DType.MXFP4, seed), CONFIG)
    _forget_stand_ins()
    monkeypatch.setitem(sys.modules, kind, None)  # as if not installed
    with pytest.raises(server_kernels.ServerKernelUnavailable, match=f"--kernel {kind}"):
        server_kernels.load(kind)


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
