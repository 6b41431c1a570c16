"""Compile-ahead without a GPU: the real Triton compiler builds the kernels for a Hopper target
(sm_90, the ptxas Triton ships) from meta tensors, and every kernel is specialized alike at every
batch size, so one compile per (config, shape) serves every M.

Each runs in a fresh interpreter: compiling needs the kernels decorated without
``TRITON_INTERPRET``, which other CPU tests set for the whole test process. The last one goes
through Ray as a run does: a compile service actor pinned to the node, its processes, outcomes
collected by the driver side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent

SPECIALIZATIONS = r"""
import json, sys
import triton
from workers import compile_ahead as ca
from workers.records import Config, DType, MoEShape

keys = []
def record(*, key, fn, **_):
    keys.append([fn.name, str(key)])
    return True  # skip compiling: only the specialization is wanted

triton.knobs.runtime.jit_cache_hook = record
ca._use_target(ca.CompileTarget("cuda", 90, 32, 232448))
shape = MoEShape(E=4, N=64, K=128, topk=2, dtype=DType(sys.argv[1]))
by_m = {}
for M in (1, 3, 40, 1000):
    keys.clear()
    with ca._compile_instead_of_launch([]):
        ca._meta_runner(shape, M, Config(16, 32, 64, 1, 4, 2)).run()
    by_m[M] = list(keys)
print(json.dumps(by_m))
"""

COMPILE = r"""
import json, sys
from workers.compile_ahead import CompileJob, CompileTarget, compile_job, setup_compile_process
from workers.records import Config, DType, MoEShape

setup_compile_process()
shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
hopper = CompileTarget("cuda", 90, 32, 232448)
tiny_shared = CompileTarget("cuda", 90, 32, 1024)
config = Config(16, 32, 32, 1, 4, 2)
out = {
    "ok": compile_job(CompileJob(shape, config, (1, 5), hopper)),
    "rejected": compile_job(CompileJob(MoEShape(4, 64, 64, 2, DType.MXFP4), Config(16, 32, 16, 1, 4, 2), (1,), hopper)),
}
print(json.dumps({k: [v.status.value, v.message, v.kernels] for k, v in out.items()}))
"""


THROUGH_RAY = r"""
import json, time
import ray
ray.init(num_cpus=3, num_gpus=1, include_dashboard=False)
from tuner.compiling import CompileAhead, PrestartedServices
from workers.compile_ahead import CompileTarget, TritonCompiler
from workers.records import Config, DType, MoEShape

node = ray.get_runtime_context().get_node_id()
shape = MoEShape(E=4, N=64, K=64, topk=2, dtype=DType.BF16)
# Started before any target is known (as while the GPU workers start), adopted by the group.
compiler = TritonCompiler("builtin")
prestarted = PrestartedServices(compiler, 120)
service = prestarted.take(node, compiler)
assert service is not None and prestarted.take(node, compiler) is None
ahead = CompileAhead(CompileTarget("cuda", 90, 32, 232448), [service], {shape: (1, 4)}, print)
configs = [Config(16, 32, 32, 1, 4, 2), Config(16, 32, 16, 1, 4, 2)]
outcomes = {}
deadline = time.monotonic() + 200
while len(outcomes) < len(configs) and time.monotonic() < deadline:
    for c in configs:
        outcome = ahead.status(shape, c)
        if outcome is not None:
            outcomes[c.label] = [outcome.status.value, outcome.message]
    ahead.pump(0.5)
stats = ahead.stats.to_json()
ahead.close()
ray.shutdown()
print(json.dumps({"outcomes": outcomes, "stats": stats}))
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One Triton cache for the module: later tests find earlier compiles in it, as a GPU worker does."""
    return tmp_path_factory.mktemp("triton-cache")


def _run(script: str, *args: str, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["bf16", "fp8_w8a8", "mxfp4"])
def test_no_kernel_specialization_depends_on_the_batch_size(dtype, cache):
    """Every launch of one MoE call (sort, GEMMs, SwiGLU, fp8 quantization) has the same key at
    every M, so what compile-ahead built for one batch size serves all of them."""
    by_m = _run(SPECIALIZATIONS, dtype, cache=cache)
    gemms = {M: [key for name, key in launches if name == "_fused_moe_gemm_kernel"] for M, launches in by_m.items()}
    assert all(len(keys) == 2 for keys in gemms.values())  # the up and the down GEMM
    names = {name for launches in by_m.values() for name, _ in launches}
    assert {"_count_experts_kernel", "_scatter_pairs_kernel", "_swiglu_kernel"} <= names
    for name in sorted(names):
        keys = {M: [key for n, key in launches if n == name] for M, launches in by_m.items()}
        assert len({json.dumps(k) for k in keys.values()}) == 1, (name, keys)


def test_compiles_for_hopper_without_a_gpu(cache):
    out = _run(COMPILE, cache=cache)
    status, message, kernels = out["ok"]
    assert status == "ok" and message == "" and kernels >= 5  # sort (2), up GEMM, SwiGLU, down GEMM
    assert any(p.suffix == ".cubin" for p in cache.rglob("*")), "no sm_90 binary in the Triton cache"
    assert out["rejected"][0] == "compile_error" and "BLOCK_SIZE_K" in out["rejected"][1]


def test_a_kernel_larger_than_the_gpus_shared_memory_is_out_of_resources(cache):
    script = COMPILE.replace("hopper)),\n    \"rejected\"", "tiny_shared)),\n    \"rejected\"")
    assert script != COMPILE
    out = _run(script, cache=cache)
    assert out["ok"][0] == "out_of_resources" and "shared memory" in out["ok"][1]


def test_compile_service_on_a_ray_node(cache):
    out = _run(THROUGH_RAY, cache=cache)
    assert out["outcomes"] == {"M16_N32_K32_G1_w4_s2": ["ok", ""],
                               "M16_N32_K16_G1_w4_s2": ["ok", ""]}
    # The node's 3 CPUs minus its 1 GPU.
    assert out["stats"]["jobs"] == 2 and out["stats"]["processes"] == 2 and out["stats"]["outcomes"] == {"ok": 2}


def test_compile_processes_run_below_the_gpu_workers_priority(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compile processes refuse the interpreter
    from workers.compile_ahead import COMPILE_NICENESS, setup_compile_process
    from workers.compile_pool import CompilePool

    pool = CompilePool(os.nice, processes=1, timeout_s=120.0, setup=setup_compile_process)
    try:
        pool.submit("niceness", 0)  # os.nice(0): the process's niceness, unchanged
        results = []
        for _ in range(240):
            results += pool.results(0.5)
            if results:
                break
    finally:
        pool.close()
    [(key, niceness, _)] = results
    assert key == "niceness" and niceness >= min(19, os.nice(0) + COMPILE_NICENESS)
